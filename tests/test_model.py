"""Tests for model.py: the MiT encoder, SegFormer's checkpoint layout, the decoder and AFANet (paper §3.1)."""

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fast
from model import AFANet, DropPath, MixTransformer, SegFormerHead, mit_b0, mit_b1
from pretrained import load_pretrained

GOLDEN = Path(__file__).parent / "golden"

# SegFormer's ImageNet checkpoint layout (mit_b0.pth / mit_b1.pth without head.*): per stage a
# patch embedding, blocks, a final norm; blocks of stages with sr_ratio > 1 add attn.sr and attn.norm.
PATCH_EMBED_KEYS = ["proj.weight", "proj.bias", "norm.weight", "norm.bias"]
BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.q.weight", "attn.q.bias", "attn.kv.weight",
              "attn.kv.bias", "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
              "mlp.fc1.weight", "mlp.fc1.bias", "mlp.dwconv.dwconv.weight", "mlp.dwconv.dwconv.bias",
              "mlp.fc2.weight", "mlp.fc2.bias"]
SPATIAL_REDUCTION_KEYS = ["attn.sr.weight", "attn.sr.bias", "attn.norm.weight", "attn.norm.bias"]
SEGFORMER_KEY_COUNT = 176  # len(torch.load("mit_b1.pth")) - 2 head keys


def segformer_keys(depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1)):
    keys = set()
    for stage, (depth, sr) in enumerate(zip(depths, sr_ratios), start=1):
        keys |= {f"patch_embed{stage}.{k}" for k in PATCH_EMBED_KEYS}
        keys |= {f"norm{stage}.weight", f"norm{stage}.bias"}
        block_keys = BLOCK_KEYS + (SPATIAL_REDUCTION_KEYS if sr > 1 else [])
        keys |= {f"block{stage}.{j}.{k}" for j in range(depth) for k in block_keys}
    return keys


@pytest.fixture(scope="module")
def b0():
    torch.manual_seed(0)
    return mit_b0().eval()


@pytest.fixture(scope="module")
def afanet():
    torch.manual_seed(0)
    return AFANet(num_classes=5, backbone="mit_b0").eval()


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ---------------------------------------------------------------- checkpoint layout and init

@pytest.mark.parametrize("factory, dims", [(mit_b0, (32, 64, 160, 256)), (mit_b1, (64, 128, 320, 512))])
def test_state_dict_keys_follow_segformer_checkpoint(factory, dims):
    state = factory().state_dict()
    assert set(state) == segformer_keys()
    assert len(state) == SEGFORMER_KEY_COUNT
    # shapes as in SegFormer's files: 7×7 then 3×3 patch convs, sr×sr reduction, depthwise 3×3 over 4·C
    assert state["patch_embed1.proj.weight"].shape == (dims[0], 3, 7, 7)
    assert state["patch_embed4.proj.weight"].shape == (dims[3], dims[2], 3, 3)
    assert state["block1.1.attn.sr.weight"].shape == (dims[0], dims[0], 8, 8)
    assert state["block3.0.attn.kv.weight"].shape == (2 * dims[2], dims[2])
    assert state["block4.1.mlp.dwconv.dwconv.weight"].shape == (4 * dims[3], 1, 3, 3)
    assert state["norm4.weight"].shape == (dims[3],)


def test_layernorm_eps_as_in_release(b0):
    # release: norm_layer eps 1e-6 for blocks and stage ends; nn.LayerNorm() defaults (1e-5) for
    # the patch embeddings and the spatial-reduction norm inside attention
    for name, module in b0.named_modules():
        if isinstance(module, nn.LayerNorm):
            expected = 1e-5 if ("patch_embed" in name or name.endswith("attn.norm")) else 1e-6
            assert module.eps == expected, name


def test_patch_embedding_geometry():
    encoder = mit_b0(strides=(4, 2, 2, 2))
    convs = [getattr(encoder, f"patch_embed{s}").proj for s in range(1, 5)]
    assert [c.kernel_size for c in convs] == [(7, 7)] + [(3, 3)] * 3
    assert [c.padding for c in convs] == [(3, 3)] + [(1, 1)] * 3
    assert [c.stride for c in convs] == [(4, 4), (2, 2), (2, 2), (2, 2)]


def test_segformer_initialisation():
    torch.manual_seed(0)
    encoder = mit_b0()
    fc1 = encoder.block1[0].mlp.fc1
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert fc1.weight.abs().max().item() <= 2.0  # trunc_normal_ bounds
    assert torch.all(fc1.bias == 0)
    proj = encoder.patch_embed1.proj  # He normal over fan-out: √(2 / (7·7·32))
    assert proj.weight.std().item() == pytest.approx(math.sqrt(2 / (7 * 7 * 32)), rel=0.1)
    dwconv = encoder.block1[0].mlp.dwconv.dwconv  # depthwise: fan-out 3·3·128 / 128 groups
    assert dwconv.weight.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.1)
    assert torch.all(encoder.norm1.weight == 1) and torch.all(encoder.norm1.bias == 0)


# ---------------------------------------------------------------- parity with the release

def test_matches_release_mix_transformer(tmp_path):
    """A tiny MiT of the authors' release (random weights, LayerNorms and biases randomised,
    spatial-reduction conv scaled down so that its LayerNorm's eps matters), saved in SegFormer's
    checkpoint layout with a classifier head: loaded with load_pretrained, our encoder reproduces
    its features and the logits of the last two blocks."""
    golden = np.load(GOLDEN / "mit_tiny.npz")
    config = {k[len("config."):]: golden[k].tolist() for k in golden.files if k.startswith("config.")}
    state = {k[len("state."):]: torch.from_numpy(golden[k]).float()
             for k in golden.files if k.startswith("state.")}
    assert "head.weight" in state and "head.bias" in state
    path = tmp_path / "mit_tiny.pth"
    torch.save(state, path)

    encoder = MixTransformer(**config, drop_path_rate=0.0).eval()
    load_pretrained(encoder, path)
    images = torch.from_numpy(golden["input"]).float()  # (2, 3, 64, 96)
    expected_logits = torch.from_numpy(golden["attn_logits_last2"])  # (2 blocks, B, nh, N, N)
    with torch.no_grad():
        # the plain forward, and the CAM passes' blocks (the fused kernel but for the last two)
        fused = functools.partial(fast.run_blocks, encoder, num_attn=2,
                                  last_block=lambda block, x, *grid: block(x, *grid))
        for forward in (encoder, lambda images: fused(images)):
            features, attn_logits = forward(images)
            for i, feature in enumerate(features):
                expected = torch.from_numpy(golden[f"feature{i + 1}"])
                assert feature.shape == expected.shape
                assert relative_error(feature, expected) <= 1e-5, (forward, i)
            assert relative_error(torch.stack(attn_logits[-2:]), expected_logits) <= 1e-5


def test_feature_maps_are_laid_out_as_the_release_lays_them_out(b0):
    """Each stage hands the next one a contiguous (B, C, H, W) map, as the release's encoder does
    (`.contiguous()` after its permute): a channels-last view of the same numbers makes the next
    patch embedding's convolution take another kernel, which rounds differently, and the
    network's outputs part from the release's at float level."""
    images = torch.randn(2, 3, 64, 96)
    fused = functools.partial(fast.run_blocks, b0, num_attn=2,
                              last_block=lambda block, x, *grid: block(x, *grid))
    with torch.no_grad():
        for forward in (b0, fused):
            features, _ = forward(images)
            assert all(f.is_contiguous() for f in features), forward


# ---------------------------------------------------------------- encoder forward

def test_feature_and_attention_shapes(b0):
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features, attn_logits = b0(images)
    assert [tuple(f.shape) for f in features] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 160, 4, 6),
                                                  (2, 256, 4, 6)]  # stage 4 stays at H/16
    # one map per block, (B, nh, N_q, N_kv) with N_kv = N_q / sr²
    assert [tuple(a.shape) for a in attn_logits] == (
        [(2, 1, 384, 6)] * 2 + [(2, 2, 96, 6)] * 2 + [(2, 5, 24, 6)] * 2 + [(2, 8, 24, 24)] * 2)
    with torch.no_grad():
        features, _ = mit_b0(strides=(4, 2, 2, 2)).eval()(images)
    assert features[3].shape == (2, 256, 2, 3)  # SegFormer's own strides: stage 4 at H/32


def naive_attention(attn, x, H, W):
    """softmax(q·kᵀ/√d)·v head by head, with keys from the spatially reduced tokens."""
    B, N, C = x.shape
    nh = attn.num_heads
    d = C // nh
    source = x
    if attn.sr_ratio > 1:
        grid = x.transpose(1, 2).reshape(B, C, H, W)
        source = attn.norm(attn.sr(grid).flatten(2).transpose(1, 2))
    q, kv = attn.q(x), attn.kv(source)
    k, v = kv[..., :C], kv[..., C:]
    heads, logits = [], []
    for head in range(nh):
        part = slice(head * d, (head + 1) * d)
        logit = q[..., part] @ k[..., part].transpose(1, 2)  # (B, N_q, N_kv)
        logits.append(logit)
        heads.append(torch.softmax(logit / math.sqrt(d), dim=-1) @ v[..., part])
    return attn.proj(torch.cat(heads, dim=-1)), torch.stack(logits, dim=1)


def test_attention_matches_naive_reference(b0):
    torch.manual_seed(1)
    for attn, (H, W) in [(b0.block2[0].attn, (8, 12)), (b0.block3[1].attn, (4, 6)), (b0.block4[0].attn, (4, 6))]:
        x = torch.randn(2, H * W, attn.q.in_features)
        with torch.no_grad():
            out, logits = attn(x, H, W)
            expected_out, expected_logits = naive_attention(attn, x, H, W)
        assert torch.allclose(logits, expected_logits, atol=1e-5, rtol=1e-5)  # unscaled, pre-softmax
        assert torch.allclose(out, expected_out, atol=1e-5, rtol=1e-5)


def test_encoder_rejects_bad_input(b0):
    with pytest.raises(ValueError, match="x must be"):
        b0(torch.randn(2, 1, 64, 64))


def test_drop_path():
    x = torch.randn(64, 3, 5)
    drop = DropPath(0.25)
    assert torch.equal(drop.eval()(x), x)
    y = drop.train()(x)
    kept = (y != 0).flatten(1).all(dim=1)
    dropped = (y == 0).flatten(1).all(dim=1)
    assert torch.all(kept | dropped) and dropped.any() and kept.any()  # whole samples, both outcomes
    assert torch.allclose(y[kept], x[kept] / 0.75)


def test_stochastic_depth_grows_linearly_over_blocks():
    encoder = mit_b1(drop_path_rate=0.1)
    rates = [block.drop_path.drop_prob for _, blocks, _ in encoder.stages() for block in blocks]
    assert rates == pytest.approx([0.1 * k / 7 for k in range(8)])  # 0 for the first, 0.1 for the last


# ---------------------------------------------------------------- SegFormer's ImageNet files

def segformer_file(encoder, path, wrapper=None, head_classes=1000):
    """Write the encoder's weights as SegFormer does: its keys plus an ImageNet head."""
    state = dict(encoder.state_dict())
    state["head.weight"] = torch.randn(head_classes, encoder.embed_dims[-1])
    state["head.bias"] = torch.randn(head_classes)
    torch.save(state if wrapper is None else {wrapper: state}, path)
    return path


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_load_segformer_weights_round_trip(tmp_path, wrapper):
    torch.manual_seed(0)
    source = mit_b0()
    path = segformer_file(source, tmp_path / "mit_b0.pth", wrapper)
    torch.manual_seed(1)
    target = mit_b0()
    load_pretrained(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_segformer_weights_wrong_keys(tmp_path):
    state = dict(mit_b0().state_dict())
    state["block2.0.attn.query.weight"] = state.pop("block2.0.attn.q.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        load_pretrained(mit_b0(), path)
    message = str(error.value)
    assert "renamed.pth" in message
    assert "block2.0.attn.q.weight" in message and "block2.0.attn.query.weight" in message


@pytest.mark.parametrize("file_backbone, model_backbone", [("mit_b1", "mit_b0"), ("mit_b0", "mit_b1")])
def test_load_segformer_weights_wrong_backbone(tmp_path, file_backbone, model_backbone):
    factories = {"mit_b0": mit_b0, "mit_b1": mit_b1}
    path = segformer_file(factories[file_backbone](), tmp_path / "weights.pth")
    with pytest.raises(ValueError) as error:
        load_pretrained(factories[model_backbone](), path)
    message = str(error.value)
    assert "weights.pth" in message and "shape" in message
    assert f"--backbone {file_backbone}" in message


def test_load_segformer_weights_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_pretrained(mit_b0(), tmp_path / "absent.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_pretrained(mit_b0(), corrupt)


# ---------------------------------------------------------------- decoder

def test_decoder_matches_naive_reference():
    torch.manual_seed(0)
    dims = (8, 16, 24, 32)
    head = SegFormerHead(dims, num_classes=3, embed_dim=12).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        head.linear_fuse.bn.running_mean.uniform_(-1, 1)
        head.linear_fuse.bn.running_var.uniform_(0.5, 2)
    features = [torch.randn(2, 8, 16, 20), torch.randn(2, 16, 8, 10), torch.randn(2, 24, 4, 5),
                torch.randn(2, 32, 4, 5)]
    embedded = []
    for stage in (4, 3, 2, 1):  # SegFormer's concatenation order
        linear = getattr(head, f"linear_c{stage}").proj
        x = torch.einsum("bchw,ec->behw", features[stage - 1], linear.weight) + linear.bias[:, None, None]
        embedded.append(F.interpolate(x, size=(16, 20), mode="bilinear", align_corners=False))
    fused = F.conv2d(torch.cat(embedded, dim=1), head.linear_fuse.conv.weight)
    bn = head.linear_fuse.bn
    fused = (fused - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    fused = torch.relu(fused * bn.weight[:, None, None] + bn.bias[:, None, None])
    expected = F.conv2d(fused, head.linear_pred.weight, head.linear_pred.bias)
    with torch.no_grad():
        actual = head(features)
    assert actual.shape == (2, 3, 16, 20)
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5)
    assert {"linear_c1.proj.weight", "linear_fuse.conv.weight", "linear_fuse.bn.running_var",
            "linear_pred.bias"} <= set(head.state_dict())
    assert head.linear_fuse.conv.bias is None


# ---------------------------------------------------------------- AFANet

def test_afanet_output_shapes(afanet):
    with torch.no_grad():
        out = afanet(torch.randn(2, 3, 64, 96))
    assert out.cls_logits.shape == (2, 4)
    assert out.seg_logits.shape == (2, 5, 16, 24)
    assert out.affinity.shape == (2, 24, 24)
    assert out.cams.shape == (2, 4, 4, 6)
    assert afanet.backbone == "mit_b0" and afanet.num_classes == 5
    assert afanet.affinity_head.num_maps == 2 * 8  # last two blocks × 8 heads


def test_afanet_classification_is_max_pooled_classifier(afanet):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = afanet(images)
        features, _ = afanet.encoder(images)
    weight = afanet.classifier.weight[:, :, 0, 0]  # (C−1, C_4)
    pooled = features[3].amax(dim=(2, 3))  # (B, C_4)
    assert torch.allclose(out.cls_logits, pooled @ weight.T, atol=1e-5, rtol=1e-5)
    expected_cams = torch.einsum("bchw,kc->bkhw", features[3], weight)  # before ReLU
    assert torch.allclose(out.cams, expected_cams, atol=1e-5, rtol=1e-5)
    assert (out.cams < 0).any()


def test_cam_equals_forward(afanet):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = afanet(images)
        cams, affinity = afanet.cam(images)
    assert torch.allclose(cams, out.cams, atol=1e-6, rtol=1e-6)
    assert torch.allclose(affinity, out.affinity, atol=1e-6, rtol=1e-6)


def decoder_batchnorm_state(model):
    bn = model.decoder.linear_fuse.bn
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


def test_cam_leaves_decoder_batchnorm_alone_in_eval_mode_or_when_asked():
    torch.manual_seed(0)
    model = AFANet(num_classes=5, backbone="mit_b0")
    images = torch.randn(2, 3, 64, 64)
    before = decoder_batchnorm_state(model)
    with torch.no_grad():
        cams, affinity = model.train().cam(images, bn_stats=False)
        model.eval().cam(images)
    assert all(torch.equal(a, b) for a, b in zip(decoder_batchnorm_state(model), before))
    assert cams.shape == (2, 4, 4, 4) and affinity.shape == (2, 16, 16)


def test_affinity_from_last_blocks_is_symmetric(afanet):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        affinity = afanet(images).affinity
        _, attn_logits = afanet.encoder(images)
        expected = afanet.affinity_head(torch.cat(attn_logits[-2:], dim=1))
    assert torch.allclose(affinity, expected, atol=1e-6, rtol=1e-6)
    assert torch.allclose(affinity, affinity.transpose(1, 2), atol=1e-6)
    assert affinity.min() > 0 and affinity.max() < 1


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = AFANet(num_classes=5, backbone="mit_b0", drop_path_rate=0.0).train()
    images = torch.randn(2, 3, 64, 64)
    cls_labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    seg_label = torch.randint(0, 5, (2, 16, 16))
    out = model(images)
    loss = (F.multilabel_soft_margin_loss(out.cls_logits, cls_labels)
            + F.cross_entropy(out.seg_logits, seg_label) + out.affinity.mean())
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_affinity_loss_trains_the_encoder_attention():
    # as in the release, the attention logits are not detached: L_aff shapes the encoder itself
    torch.manual_seed(0)
    model = AFANet(num_classes=3, backbone="mit_b0", drop_path_rate=0.0).train()
    model(torch.randn(2, 3, 64, 64)).affinity.mean().backward()
    last = model.encoder.block4[-1].attn
    for parameter in (last.q.weight, last.kv.weight, model.encoder.patch_embed1.proj.weight,
                      model.affinity_head.proj.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.decoder.parameters())
    assert model.classifier.weight.grad is None


def test_param_groups_cover_every_parameter_once(afanet):
    groups = afanet.param_groups()
    assert set(groups) == {"encoder", "encoder_norm", "heads", "decoder"}
    grouped = [id(p) for params in groups.values() for p in params]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in afanet.parameters()}
    names = {id(p): name for name, p in afanet.named_parameters()}
    assert all("norm" in names[id(p)] for p in groups["encoder_norm"])
    assert all(names[id(p)].startswith("encoder.") and "norm" not in names[id(p)] for p in groups["encoder"])
    assert {names[id(p)] for p in groups["heads"]} == {
        "classifier.weight", "affinity_head.proj.weight", "affinity_head.proj.bias"}
    assert all(names[id(p)].startswith("decoder.") for p in groups["decoder"])


def test_afanet_encoder_takes_pretrained_weights(tmp_path):
    torch.manual_seed(0)
    source = mit_b0()
    path = segformer_file(source, tmp_path / "mit_b0.pth")
    model = AFANet(num_classes=3, backbone="mit_b0")
    load_pretrained(model.encoder, path)
    assert torch.equal(model.encoder.block4[1].attn.kv.weight, source.block4[1].attn.kv.weight)


def test_afanet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        AFANet(num_classes=1, backbone="mit_b0")
    with pytest.raises(ValueError, match="backbone"):
        AFANet(num_classes=3, backbone="resnet50")
    with pytest.raises(ValueError, match="afa_blocks"):
        AFANet(num_classes=3, backbone="mit_b0", afa_blocks=3)
