"""Tests for vit.py: the plain ViT encoder, its timm key layout, its attention logits and position
embeddings, and AFANet on a ViT (paper §3.1–3.2 on a plain ViT, as ToCo and later work use)."""

import pytest
import torch
import torch.nn.functional as F

from model import SegFormerHead
from vit import (VIT_CONFIGS, VisionTransformer, evenly_spaced_blocks, resample_position_embedding,
                 vit_b16, vit_s16, vit_tiny16)

# timm's VisionTransformer without its classifier (timm/models/vision_transformer.py: cls_token,
# pos_embed, patch_embed.proj, blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm).
TIMM_BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                   "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                   "mlp.fc2.weight", "mlp.fc2.bias"]


def timm_vit_shapes(width, depth=12, patch=16, grid=14):
    """Every key of timm's ViT state dict (no head) with its shape."""
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, 1 + grid * grid, width),
              "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,),
              "norm.weight": (width,), "norm.bias": (width,)}
    block = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.qkv.weight": (3 * width, width),
             "attn.qkv.bias": (3 * width,), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
             "norm2.weight": (width,), "norm2.bias": (width,), "mlp.fc1.weight": (4 * width, width),
             "mlp.fc1.bias": (4 * width,), "mlp.fc2.weight": (width, 4 * width), "mlp.fc2.bias": (width,)}
    assert list(block) == TIMM_BLOCK_KEYS
    for i in range(depth):
        shapes.update({f"blocks.{i}.{key}": shape for key, shape in block.items()})
    return shapes


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vit_tiny16().eval()


def naive_vit(encoder, x):
    """The ViT forward written out: patches by unfold, per-head attention in a loop, no fused kernel.
    Returns (features after the feature blocks (B, D, h, w), logits of every block over all T tokens)."""
    B, _, H, W = x.shape
    p, D = encoder.patch_size, encoder.embed_dim
    x = F.pad(x, (0, -W % p, 0, -H % p))  # zeros at the bottom and right
    h, w = x.shape[-2] // p, x.shape[-1] // p
    patches = x.unfold(2, p, p).unfold(3, p, p)  # (B, 3, h, w, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, h * w, -1)  # (B, N, 3·p·p)
    weight = encoder.patch_embed.proj.weight.reshape(D, -1)  # (D, 3·p·p)
    tokens = patches @ weight.T + encoder.patch_embed.proj.bias  # (B, N, D)
    grid = encoder.pos_embed[:, 1:].reshape(1, *encoder.grid_size, D).permute(0, 3, 1, 2)
    if (h, w) != encoder.grid_size:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    pos = torch.cat([encoder.pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)  # (1, T, D)
    x = torch.cat([encoder.cls_token.expand(B, -1, -1), tokens], dim=1) + pos  # (B, T, D)
    features, all_logits = [], []
    for index, block in enumerate(encoder.blocks):
        nh = block.attn.num_heads
        d = D // nh
        y = F.layer_norm(x, (D,), block.norm1.weight, block.norm1.bias, eps=1e-6)
        q, k, v = (y @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(D, dim=-1)  # (B, T, D) each
        heads, logits = [], []
        for head in range(nh):
            part = slice(head * d, (head + 1) * d)
            logit = q[..., part] @ k[..., part].transpose(1, 2)  # (B, T, T)
            logits.append(logit)
            heads.append(torch.softmax(logit / d ** 0.5, dim=-1) @ v[..., part])  # (B, T, d)
        all_logits.append(torch.stack(logits, dim=1))  # (B, nh, T, T)
        x = x + torch.cat(heads, dim=-1) @ block.attn.proj.weight.T + block.attn.proj.bias
        y = F.layer_norm(x, (D,), block.norm2.weight, block.norm2.bias, eps=1e-6)
        y = F.gelu(y @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
        x = x + y @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
        if index in encoder.feature_blocks:
            out = F.layer_norm(x, (D,), encoder.norm.weight, encoder.norm.bias, eps=1e-6)[:, 1:]
            features.append(out.transpose(1, 2).reshape(B, D, h, w))
    return features, all_logits


# ---------------------------------------------------------------- layout and sizes

@pytest.mark.parametrize("factory, width", [(vit_tiny16, 192), (vit_s16, 384)])
def test_state_dict_is_timms_vit_layout(factory, width):
    with torch.device("meta"):  # shapes only
        state = factory().state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == timm_vit_shapes(width)


@pytest.mark.parametrize("factory, parameters", [(vit_tiny16, 5_524_416), (vit_s16, 21_665_664),
                                                 (vit_b16, 85_798_656)])
def test_parameter_counts_match_timm_without_head(factory, parameters):
    # timm's vit_tiny/small/base_patch16_224 have 5,717,416 / 22,050,664 / 86,567,656 parameters with
    # their 1000-class heads (D·1000 + 1000)
    with torch.device("meta"):
        encoder = factory()
    assert sum(p.numel() for p in encoder.parameters()) == parameters


def test_configurations_and_interface():
    assert {name: tuple(c.values()) for name, c in VIT_CONFIGS.items()} == {
        "vit_tiny16": (192, 12, 3), "vit_s16": (384, 12, 6), "vit_b16": (768, 12, 12)}
    with torch.device("meta"):
        encoder = vit_b16()
    assert encoder.embed_dims == (768,) * 4 and encoder.num_heads == (12,) * 4
    assert encoder.strides == (16, 1, 1, 1) and encoder.sr_ratios == (1, 1, 1, 1)
    assert encoder.depths == (3, 3, 3, 3) and sum(encoder.depths) == encoder.depth == 12
    assert encoder.feature_blocks == (2, 5, 8, 11) and encoder.grid_size == (14, 14)
    assert evenly_spaced_blocks(8) == (1, 3, 5, 7) and evenly_spaced_blocks(6, 3) == (1, 3, 5)
    norms = [m.eps for m in encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1 and set(norms) == {1e-6}


def test_initialisation_like_timm(tiny):
    encoder = tiny
    assert encoder.cls_token.std() < 1e-5  # normal, std 1e-6
    assert 0.019 < encoder.pos_embed.std() < 0.021  # truncated normal, std 0.02
    qkv = encoder.blocks[0].attn.qkv
    assert 0.019 < qkv.weight.std() < 0.021 and not qkv.bias.any()
    assert (encoder.norm.weight == 1).all() and not encoder.norm.bias.any()


# ---------------------------------------------------------------- forward

def test_features_and_logits_match_naive_reference(tiny):
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        features, attn_logits = tiny(x)
        expected_features, expected_logits = naive_vit(tiny, x)
    assert len(features) == 4 and len(attn_logits) == 12
    for actual, expected in zip(features, expected_features):
        assert actual.shape == (2, 192, 4, 5)
        assert torch.allclose(actual, expected, atol=1e-4, rtol=1e-4)
    for actual, expected in zip(attn_logits, expected_logits):
        # unscaled q·kᵀ between patch tokens: the class token's row and column dropped
        assert actual.shape == (2, 3, 20, 20)
        assert torch.allclose(actual, expected[:, :, 1:, 1:], atol=1e-4, rtol=1e-4)


def test_attention_logits_are_q_dot_k_of_the_block_input(tiny):
    """The returned logits of one block are q·kᵀ of that block's own input, recomputed by hand."""
    block = tiny.blocks[-1]
    captured = {}
    handle = block.register_forward_pre_hook(lambda module, args, kwargs: captured.update(x=args[0]),
                                             with_kwargs=True)
    try:
        with torch.no_grad():
            _, attn_logits = tiny(torch.randn(1, 3, 48, 48))
    finally:
        handle.remove()
    x = captured["x"]  # (1, T, D)
    D, nh = tiny.embed_dim, block.attn.num_heads
    y = F.layer_norm(x, (D,), block.norm1.weight, block.norm1.bias, eps=1e-6)
    q, k = (y @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(D, dim=-1)[:2]  # (1, T, D)
    q = q[:, 1:].reshape(1, 9, nh, D // nh).transpose(1, 2)  # (1, nh, N, d), patch tokens
    k = k[:, 1:].reshape(1, 9, nh, D // nh).transpose(1, 2)
    assert len(attn_logits) == 12
    assert torch.allclose(attn_logits[-1], q @ k.transpose(-2, -1), atol=1e-4, rtol=1e-5)


def test_input_padded_to_the_ceiling_grid(tiny):
    x = torch.randn(1, 3, 70, 100)  # not multiples of 16: grid ⌈70/16⌉ × ⌈100/16⌉ = 5 × 7
    padded = F.pad(x, (0, 112 - 100, 0, 80 - 70))  # zeros at the bottom and right
    with torch.no_grad():
        features, logits = tiny(x)
        expected, expected_logits = tiny(padded)
    assert features[-1].shape == (1, 192, 5, 7) and logits[-1].shape == (1, 3, 35, 35)
    assert torch.equal(features[-1], expected[-1]) and torch.equal(logits[-1], expected_logits[-1])


def test_encoder_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match="x must be"):
        tiny(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="feature_blocks"):
        VisionTransformer(64, 4, 2, feature_blocks=(0, 1, 2))


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    encoder = VisionTransformer(embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0).train()
    features, attn_logits = encoder(torch.randn(2, 3, 40, 56))  # a non-pre-training grid
    loss = sum(f.square().mean() for f in features) + sum(a.mean() for a in attn_logits)
    loss.backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- position embedding

def test_position_embedding_is_identity_at_224(tiny):
    assert tiny.position_embedding(14, 14) is tiny.pos_embed  # untouched at the pre-training grid
    assert resample_position_embedding(tiny.pos_embed, (14, 14), (14, 14)) is tiny.pos_embed


@pytest.mark.parametrize("grid", [(7, 7), (21, 21), (10, 20), (32, 24)])  # 0.5, 1.5 scales, non-square
def test_position_embedding_resampled_keeps_class_token(tiny, grid):
    resized = tiny.position_embedding(*grid)
    h, w = grid
    assert resized.shape == (1, 1 + h * w, 192)
    assert torch.equal(resized[:, 0], tiny.pos_embed[:, 0])  # the class token's embedding as it is
    # timm's resample_abs_pos_embed: the grid alone, bicubic with antialiasing, align_corners False
    square = tiny.pos_embed[0, 1:].reshape(14, 14, 192).permute(2, 0, 1)[None]  # (1, D, 14, 14)
    expected = F.interpolate(square, size=grid, mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(resized[0, 1:], expected[0].flatten(1).T, atol=1e-6)


def test_position_embedding_resampling_known_answers():
    D = 4
    constant = torch.full((1, 1 + 14 * 14, D), 0.25)
    constant[:, 0] = -1.0  # the class token's embedding differs from the grid's
    for grid in ((7, 7), (24, 24), (5, 9)):
        out = resample_position_embedding(constant, (14, 14), grid)
        assert torch.allclose(out[:, 1:], torch.full_like(out[:, 1:], 0.25), atol=1e-6)  # constant stays
        assert torch.equal(out[:, 0], constant[:, 0])
    # 24 × 24 → 12 × 12 with antialiasing averages pairs: a ±1 checkerboard vanishes, not aliases
    rows, cols = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    checker = ((rows + cols) % 2 * 2 - 1).float()  # (24, 24) in {-1, 1}
    pos = torch.cat([torch.zeros(1, 1, 1), checker.reshape(1, -1, 1)], dim=1)  # (1, 577, 1)
    assert resample_position_embedding(pos, (24, 24), (12, 12))[:, 1:].abs().max() < 0.1
    with pytest.raises(ValueError, match="tokens"):
        resample_position_embedding(constant, (13, 13), (7, 7))


def test_position_embedding_gradient_flows_through_resampling(tiny):
    pos = tiny.pos_embed.detach().clone().requires_grad_()
    resample_position_embedding(pos, (14, 14), (9, 11)).sum().backward()
    assert pos.grad[:, 0].eq(1).all()  # the class token's row passes through unchanged
    assert torch.allclose(pos.grad[:, 1:].sum(dim=1), torch.full((1, 192), 99.0), rtol=1e-4)


# ---------------------------------------------------------------- decoder and AFANet

def test_segformer_head_takes_four_stride16_maps(tiny):
    head = SegFormerHead(tiny.embed_dims, num_classes=5).eval()
    with torch.no_grad():
        features, _ = tiny(torch.randn(2, 3, 64, 96))
        logits = head(features)
    assert logits.shape == (2, 5, 4, 6)  # stride 16: every map is at the first map's size


def afanet_or_skip(**kwargs):
    from model import AFANet
    try:
        return AFANet(num_classes=5, backbone="vit_tiny16", **kwargs)
    except ValueError as error:
        if "backbone" in str(error):
            pytest.skip("AFANet does not build ViT backbones yet")
        raise


def test_afanet_on_a_vit():
    torch.manual_seed(0)
    model = afanet_or_skip().eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(images)
        cams, affinity = model.cam(images)
        features, attn_logits = model.encoder(images)
        attn_logits = attn_logits[-2:]
    h, w, N = 4, 6, 24
    assert out.cls_logits.shape == (2, 4) and out.cams.shape == (2, 4, h, w)
    assert out.seg_logits.shape == (2, 5, h, w)  # the decoder at stride 16
    assert out.affinity.shape == (2, N, N)
    assert model.affinity_head.num_maps == 2 * 3  # the last two blocks × 3 heads
    assert model.classifier.in_channels == 192
    weight = model.classifier.weight[:, :, 0, 0]  # (C−1, D)
    assert torch.allclose(out.cls_logits, features[-1].amax(dim=(2, 3)) @ weight.T, atol=1e-5)
    assert torch.allclose(out.affinity, model.affinity_head(torch.cat(attn_logits, dim=1)), atol=1e-6)
    assert torch.allclose(out.affinity, out.affinity.transpose(1, 2), atol=1e-6)
    assert torch.allclose(cams, out.cams, atol=1e-5) and torch.allclose(affinity, out.affinity, atol=1e-6)


def test_afanet_vit_multi_scale_cam_and_random_walk():
    from attention_affinity import window_mask
    from cam import multi_scale_cam
    from random_walk import propagate
    torch.manual_seed(0)
    model = afanet_or_skip().eval()
    images = torch.randn(2, 3, 64, 64)
    cams, affinity = multi_scale_cam(model, images, scales=(1.0, 0.5, 1.5))  # grids 4², 2², 6²
    assert cams.shape == (2, 4, 64, 64) and affinity.shape == (2, 36, 36)
    assert cams.min() >= 0 and cams.max() <= 1
    cls_labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    small = F.interpolate(cams, size=(6, 6), mode="bilinear", align_corners=False)
    walked = propagate(small * cls_labels[:, :, None, None], affinity, window_mask(6, 6, 8), cls_labels, 0.45)
    assert walked.shape == (2, 5, 6, 6) and torch.isfinite(walked).all()
    assert not walked[0, 2].any() and not walked[1, 1].any()  # absent classes stay 0


def test_afanet_vit_param_groups_and_gradients():
    torch.manual_seed(0)
    model = afanet_or_skip(drop_path_rate=0.0).train()
    groups = model.param_groups()
    names = {id(p): name for name, p in model.named_parameters()}
    grouped = [id(p) for params in groups.values() for p in params]
    assert len(grouped) == len(set(grouped)) == len(names)
    norm_names = {names[id(p)] for p in groups["encoder_norm"]}
    assert norm_names == {n for n in names.values() if n.startswith("encoder.") and "norm" in n}
    assert {"encoder.cls_token", "encoder.pos_embed"} <= {names[id(p)] for p in groups["encoder"]}
    out = model(torch.randn(2, 3, 48, 48))
    loss = F.multilabel_soft_margin_loss(out.cls_logits, torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]]))
    loss = loss + F.cross_entropy(out.seg_logits, torch.randint(0, 5, (2, 3, 3))) + out.affinity.mean()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_tiny_vit_trains_through_every_stage_of_train_py(tmp_path):
    """train.py's whole step on a ViT: CAM, PAR, affinity labels, random walk, the three losses."""
    import json
    import math

    import config
    import synthetic
    import train
    synthetic.make_synthetic(str(tmp_path / "synthetic"), num_train=8, num_val=2, size=64)
    flags = dict(data="synthetic", data_root=tmp_path / "synthetic", work_dir=tmp_path / "run", crop=64,
                 batch_size=2, iters=3, cam_iters=1, switch_iters=2, eval_every=3, warmup_iters=1,
                 workers=0, val_batch_size=2, num_figures=1, log_every=1, backbone="vit_tiny16")
    argv = [f"--{key.replace('_', '-')}={value}" for key, value in flags.items()]
    try:
        config.check_config(config.parse_config(argv))
    except config.ConfigError as error:
        if "backbone" in str(error):
            pytest.skip("train.py does not accept ViT backbones yet")
        raise
    assert train.main(argv) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3]
    assert all(math.isfinite(log[-1][key]) for key in ("cls", "seg", "aff"))  # after the switch: AFA label
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 3
