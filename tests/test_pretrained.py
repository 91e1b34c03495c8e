"""Tests for pretrained.py: every weight layout users download loads strictly, and every wrong file
gives one clear line (paper §4.1: the encoder starts from ImageNet weights).

The key names below are written out from the projects' own sources — transformers'
modeling_segformer.py / convert_segformer_original_to_pytorch.py and convert_vit_timm_to_pytorch.py,
mmsegmentation's tools/model_converters/mit2mmseg.py, timm's vision_transformer.py — not derived
from pretrained.py's tables, so that a wrong rename fails here.
"""

import argparse
import importlib.util
import sys

import pytest
import torch

from model import AFANet, mit_b0
from pretrained import (afanet_from_release, afanet_to_release, describe_state, load_pretrained,
                        read_state_dict, release_prefix, segformer_from_hf, segformer_to_hf)
from vit import VisionTransformer, resample_position_embedding, vit_tiny16

MIT_B0 = dict(hidden_sizes=(32, 64, 160, 256), depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1))
MIT_B1 = dict(hidden_sizes=(64, 128, 320, 512), depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1))


def random_state(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def hf_segformer_shapes(hidden_sizes, depths, sr_ratios, num_labels=1000):
    """nvidia/mit-b* as transformers' SegformerForImageClassification saves it."""
    shapes, encoder, in_channels = {}, "segformer.encoder.", 3
    for i, (C, depth, sr) in enumerate(zip(hidden_sizes, depths, sr_ratios)):
        k = 7 if i == 0 else 3  # config.patch_sizes (7, 3, 3, 3)
        shapes.update({f"{encoder}patch_embeddings.{i}.proj.weight": (C, in_channels, k, k),
                       f"{encoder}patch_embeddings.{i}.proj.bias": (C,),
                       f"{encoder}patch_embeddings.{i}.layer_norm.weight": (C,),
                       f"{encoder}patch_embeddings.{i}.layer_norm.bias": (C,)})
        for j in range(depth):
            block = f"{encoder}block.{i}.{j}."
            for linear in ("attention.self.query", "attention.self.key", "attention.self.value",
                           "attention.output.dense"):
                shapes.update({f"{block}{linear}.weight": (C, C), f"{block}{linear}.bias": (C,)})
            norms = ["layer_norm_1", "layer_norm_2"]
            if sr > 1:
                shapes.update({f"{block}attention.self.sr.weight": (C, C, sr, sr),
                               f"{block}attention.self.sr.bias": (C,)})
                norms.append("attention.self.layer_norm")
            for norm in norms:
                shapes.update({f"{block}{norm}.weight": (C,), f"{block}{norm}.bias": (C,)})
            shapes.update({f"{block}mlp.dense1.weight": (4 * C, C), f"{block}mlp.dense1.bias": (4 * C,),
                           f"{block}mlp.dwconv.dwconv.weight": (4 * C, 1, 3, 3),
                           f"{block}mlp.dwconv.dwconv.bias": (4 * C,),
                           f"{block}mlp.dense2.weight": (C, 4 * C), f"{block}mlp.dense2.bias": (C,)})
        shapes.update({f"{encoder}layer_norm.{i}.weight": (C,), f"{encoder}layer_norm.{i}.bias": (C,)})
        in_channels = C
    shapes.update({"classifier.weight": (num_labels, hidden_sizes[-1]), "classifier.bias": (num_labels,)})
    return shapes


def mmseg_mit_shapes(hidden_sizes, depths, sr_ratios):
    """An mmsegmentation SegFormer checkpoint's backbone (MixVisionTransformer, mit2mmseg names)."""
    shapes, in_channels = {}, 3
    for i, (C, depth, sr) in enumerate(zip(hidden_sizes, depths, sr_ratios)):
        k = 7 if i == 0 else 3
        stage = f"backbone.layers.{i}."
        shapes.update({f"{stage}0.projection.weight": (C, in_channels, k, k), f"{stage}0.projection.bias": (C,),
                       f"{stage}0.norm.weight": (C,), f"{stage}0.norm.bias": (C,),
                       f"{stage}2.weight": (C,), f"{stage}2.bias": (C,)})
        for j in range(depth):
            block = f"{stage}1.{j}."
            shapes.update({f"{block}norm1.weight": (C,), f"{block}norm1.bias": (C,),
                           f"{block}attn.attn.in_proj_weight": (3 * C, C), f"{block}attn.attn.in_proj_bias": (3 * C,),
                           f"{block}attn.attn.out_proj.weight": (C, C), f"{block}attn.attn.out_proj.bias": (C,),
                           f"{block}norm2.weight": (C,), f"{block}norm2.bias": (C,),
                           f"{block}ffn.layers.0.weight": (4 * C, C, 1, 1), f"{block}ffn.layers.0.bias": (4 * C,),
                           f"{block}ffn.layers.1.weight": (4 * C, 1, 3, 3), f"{block}ffn.layers.1.bias": (4 * C,),
                           f"{block}ffn.layers.4.weight": (C, 4 * C, 1, 1), f"{block}ffn.layers.4.bias": (C,)})
            if sr > 1:
                shapes.update({f"{block}attn.sr.weight": (C, C, sr, sr), f"{block}attn.sr.bias": (C,),
                               f"{block}attn.norm.weight": (C,), f"{block}attn.norm.bias": (C,)})
        in_channels = C
    shapes.update({"decode_head.conv_seg.weight": (150, 256, 1, 1), "decode_head.conv_seg.bias": (150,),
                   "decode_head.fusion_conv.conv.weight": (256, 1024, 1, 1)})
    return shapes


def timm_vit_shapes(width, depth=12, patch=16, grid=14, num_classes=1000):
    """timm's / DeiT's VisionTransformer state dict, with its classifier head."""
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, 1 + grid * grid, width),
              "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,),
              "norm.weight": (width,), "norm.bias": (width,),
              "head.weight": (num_classes, width), "head.bias": (num_classes,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({f"{b}norm1.weight": (width,), f"{b}norm1.bias": (width,),
                       f"{b}attn.qkv.weight": (3 * width, width), f"{b}attn.qkv.bias": (3 * width,),
                       f"{b}attn.proj.weight": (width, width), f"{b}attn.proj.bias": (width,),
                       f"{b}norm2.weight": (width,), f"{b}norm2.bias": (width,),
                       f"{b}mlp.fc1.weight": (4 * width, width), f"{b}mlp.fc1.bias": (4 * width,),
                       f"{b}mlp.fc2.weight": (width, 4 * width), f"{b}mlp.fc2.bias": (width,)})
    return shapes


def hf_vit_shapes(width, depth=12, patch=16, grid=14, num_labels=1000):
    """transformers' ViTForImageClassification (google/vit-*, facebook/deit-*-patch16-224)."""
    shapes = {"vit.embeddings.cls_token": (1, 1, width),
              "vit.embeddings.position_embeddings": (1, 1 + grid * grid, width),
              "vit.embeddings.patch_embeddings.projection.weight": (width, 3, patch, patch),
              "vit.embeddings.patch_embeddings.projection.bias": (width,),
              "vit.layernorm.weight": (width,), "vit.layernorm.bias": (width,),
              "classifier.weight": (num_labels, width), "classifier.bias": (num_labels,)}
    for i in range(depth):
        layer = f"vit.encoder.layer.{i}."
        for linear, shape in (("attention.attention.query", (width, width)), ("attention.attention.key", (width, width)),
                              ("attention.attention.value", (width, width)), ("attention.output.dense", (width, width)),
                              ("intermediate.dense", (4 * width, width)), ("output.dense", (width, 4 * width))):
            shapes.update({f"{layer}{linear}.weight": shape, f"{layer}{linear}.bias": (shape[0],)})
        for norm in ("layernorm_before", "layernorm_after"):
            shapes.update({f"{layer}{norm}.weight": (width,), f"{layer}{norm}.bias": (width,)})
    return shapes


@pytest.fixture(scope="module")
def b0():
    torch.manual_seed(1)
    return mit_b0()


@pytest.fixture(scope="module")
def b0_state(b0):
    """A random state dict in the layout of mit_b0.pth without its head (builds no model)."""
    return random_state({key: tuple(value.shape) for key, value in b0.state_dict().items()}, seed=5)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    return vit_tiny16()


def error_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and message.strip() == message, message
    return message


# ---------------------------------------------------------------- SegFormer MiT layouts

def test_mit_release_layout_loads_and_drops_head(tmp_path, b0, b0_state):
    state = dict(b0_state, **{"head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)})
    torch.save(state, tmp_path / "mit_b0.pth")
    description = load_pretrained(b0, tmp_path / "mit_b0.pth")
    for key, value in b0_state.items():
        assert torch.equal(b0.state_dict()[key], value), key
    assert "SegFormer MiT" in description and "mit_b0" in description and "head.*" in description


def test_hf_segformer_layout_loads_strictly(tmp_path, b0):
    state = random_state(hf_segformer_shapes(**MIT_B0))
    torch.save(state, tmp_path / "pytorch_model.bin")
    description = load_pretrained(b0, tmp_path / "pytorch_model.bin")
    assert "Hugging Face SegFormer" in description and "classifier.*" in description
    ours, hf = b0.state_dict(), "segformer.encoder."
    # the renamings of convert_segformer_original_to_pytorch.py, key by key for one block per kind
    assert torch.equal(ours["patch_embed1.proj.weight"], state[f"{hf}patch_embeddings.0.proj.weight"])
    assert torch.equal(ours["patch_embed2.norm.bias"], state[f"{hf}patch_embeddings.1.layer_norm.bias"])
    assert torch.equal(ours["norm4.weight"], state[f"{hf}layer_norm.3.weight"])
    block = f"{hf}block.0.1."
    assert torch.equal(ours["block1.1.attn.q.weight"], state[f"{block}attention.self.query.weight"])
    assert torch.equal(ours["block1.1.attn.kv.weight"], torch.cat(
        [state[f"{block}attention.self.key.weight"], state[f"{block}attention.self.value.weight"]]))
    assert torch.equal(ours["block1.1.attn.kv.bias"][32:], state[f"{block}attention.self.value.bias"])
    assert torch.equal(ours["block1.1.attn.sr.weight"], state[f"{block}attention.self.sr.weight"])
    assert torch.equal(ours["block1.1.attn.norm.weight"], state[f"{block}attention.self.layer_norm.weight"])
    assert torch.equal(ours["block1.1.attn.proj.bias"], state[f"{block}attention.output.dense.bias"])
    assert torch.equal(ours["block1.1.norm1.weight"], state[f"{block}layer_norm_1.weight"])
    assert torch.equal(ours["block1.1.norm2.bias"], state[f"{block}layer_norm_2.bias"])
    assert torch.equal(ours["block1.1.mlp.fc1.weight"], state[f"{block}mlp.dense1.weight"])
    assert torch.equal(ours["block1.1.mlp.dwconv.dwconv.weight"], state[f"{block}mlp.dwconv.dwconv.weight"])
    assert torch.equal(ours["block1.1.mlp.fc2.weight"], state[f"{block}mlp.dense2.weight"])


def test_hf_round_trip_is_exact(tmp_path, b0, b0_state):
    hf = segformer_to_hf(b0_state)
    expected = hf_segformer_shapes(**MIT_B0)
    del expected["classifier.weight"], expected["classifier.bias"]
    assert {key: tuple(value.shape) for key, value in hf.items()} == expected  # the real names and shapes
    assert segformer_from_hf({k[len("segformer."):]: v for k, v in hf.items()}).keys() == b0_state.keys()
    torch.save(hf, tmp_path / "hf.bin")
    load_pretrained(b0, tmp_path / "hf.bin")
    for key, value in b0_state.items():
        assert torch.equal(b0.state_dict()[key], value), key


def test_hf_segmentation_model_and_bare_encoder_load(tmp_path, b0):
    state = random_state(hf_segformer_shapes(**MIT_B0))
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    segmentation = dict(state, **{"decode_head.linear_c.0.proj.weight": torch.randn(256, 32),
                                  "decode_head.classifier.weight": torch.randn(150, 256, 1, 1)})
    torch.save(segmentation, tmp_path / "segformer-b0-ade.bin")
    assert "decode_head.*" in load_pretrained(b0, tmp_path / "segformer-b0-ade.bin")
    bare = {k[len("segformer."):]: v for k, v in state.items()}  # SegformerModel saved alone
    torch.save(bare, tmp_path / "bare.bin")
    load_pretrained(b0, tmp_path / "bare.bin")
    assert torch.equal(b0.state_dict()["norm1.weight"], state["segformer.encoder.layer_norm.0.weight"])


def test_full_segformer_repository_checkpoint_loads_backbone(tmp_path, b0, b0_state):
    state = {f"backbone.{k}": v for k, v in b0_state.items()}
    state["decode_head.linear_pred.weight"] = torch.randn(150, 256, 1, 1)
    checkpoint = {"meta": {"CLASSES": ("wall", "building"), "config": "model = dict(...)", "iter": 160000},
                  "state_dict": state}
    torch.save(checkpoint, tmp_path / "segformer.b0.512x512.ade.160k.pth")
    description = load_pretrained(b0, tmp_path / "segformer.b0.512x512.ade.160k.pth")
    assert "backbone" in description and "decode_head.*" in description
    for key, value in b0_state.items():
        assert torch.equal(b0.state_dict()[key], value), key


def test_mmseg_mit_layout_loads_strictly(tmp_path, b0):
    state = random_state(mmseg_mit_shapes(**MIT_B0))
    torch.save({"meta": {"mmseg_version": "0.30.0"}, "state_dict": state}, tmp_path / "mmseg.pth")
    assert "mmsegmentation" in load_pretrained(b0, tmp_path / "mmseg.pth")
    ours, block = b0.state_dict(), "backbone.layers.2.1.1."
    in_proj = state[f"{block}attn.attn.in_proj_weight"]  # [q; k; v], mit2mmseg's cat([q, kv])
    assert torch.equal(ours["block3.1.attn.q.weight"], in_proj[:160])
    assert torch.equal(ours["block3.1.attn.kv.weight"], in_proj[160:])
    assert torch.equal(ours["block3.1.attn.kv.bias"], state[f"{block}attn.attn.in_proj_bias"][160:])
    assert torch.equal(ours["block3.1.attn.proj.weight"], state[f"{block}attn.attn.out_proj.weight"])
    assert torch.equal(ours["block3.1.mlp.fc1.weight"], state[f"{block}ffn.layers.0.weight"][:, :, 0, 0])
    assert torch.equal(ours["block3.1.mlp.dwconv.dwconv.bias"], state[f"{block}ffn.layers.1.bias"])
    assert torch.equal(ours["block3.1.mlp.fc2.weight"], state[f"{block}ffn.layers.4.weight"][:, :, 0, 0])
    assert torch.equal(ours["block3.1.attn.sr.weight"], state[f"{block}attn.sr.weight"])
    assert torch.equal(ours["patch_embed3.proj.weight"], state["backbone.layers.2.0.projection.weight"])
    assert torch.equal(ours["norm3.bias"], state["backbone.layers.2.2.bias"])


def test_afa_checkpoint_encoder_and_ddp_prefix_load(tmp_path, b0, b0_state):
    torch.manual_seed(0)
    model = AFANet(num_classes=3, backbone="mit_b0")
    torch.save({"model": model.state_dict(), "config": {"backbone": "mit_b0"}, "step": 10}, tmp_path / "iter_10.pth")
    assert "AFA checkpoint" in load_pretrained(b0, tmp_path / "iter_10.pth")
    assert torch.equal(b0.block4[1].attn.kv.weight, model.encoder.block4[1].attn.kv.weight)
    torch.save({f"module.{k}": v for k, v in b0_state.items()}, tmp_path / "ddp.pth")
    load_pretrained(b0, tmp_path / "ddp.pth")
    assert torch.equal(b0.block4[1].attn.kv.weight, b0_state["block4.1.attn.kv.weight"])


# ---------------------------------------------------------------- the authors' trained networks

def release_head_shapes(num_classes=21, embed_dims=(64, 128, 320, 512), decoder_dim=256, maps=16):
    """What the release's trained WeTr holds besides its encoder, written out from its sources:
    wetr/segformer_head.py (MLP.proj per stage, mmcv's ConvModule with SyncBN: conv without bias and
    bn, the final 1×1 conv) and wetr/model_attn_aff.py (attn_proj 16 -> 1, classifier without bias)."""
    shapes = {}
    for stage, dim in enumerate(embed_dims, start=1):
        shapes.update({f"decoder.linear_c{stage}.proj.weight": (decoder_dim, dim),
                       f"decoder.linear_c{stage}.proj.bias": (decoder_dim,)})
    shapes.update({"decoder.linear_fuse.conv.weight": (decoder_dim, 4 * decoder_dim, 1, 1),
                   "decoder.linear_fuse.bn.weight": (decoder_dim,), "decoder.linear_fuse.bn.bias": (decoder_dim,),
                   "decoder.linear_fuse.bn.running_mean": (decoder_dim,),
                   "decoder.linear_fuse.bn.running_var": (decoder_dim,),
                   "decoder.linear_fuse.bn.num_batches_tracked": (),
                   "decoder.linear_pred.weight": (num_classes, decoder_dim, 1, 1),
                   "decoder.linear_pred.bias": (num_classes,),
                   "attn_proj.weight": (1, maps, 1, 1), "attn_proj.bias": (1,),
                   "classifier.weight": (num_classes - 1, embed_dims[-1], 1, 1)})
    return shapes


def test_afanet_in_the_release_layout_has_the_release_keys():
    model = AFANet(num_classes=21, backbone="mit_b0")
    release = afanet_to_release(model.state_dict())
    assert all(key.startswith("module.") for key in release)
    shapes = {key[len("module."):]: tuple(value.shape) for key, value in release.items()}
    encoder = {key: shape for key, shape in shapes.items() if key.startswith("encoder.")}
    assert {key: shape for key, shape in shapes.items() if key not in encoder} == \
        release_head_shapes(embed_dims=(32, 64, 160, 256))
    assert encoder == {f"encoder.{key}": tuple(value.shape) for key, value in model.encoder.state_dict().items()}


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_release_layout_round_trip(prefix):
    torch.manual_seed(0)
    state = AFANet(num_classes=6, backbone="mit_b0").state_dict()
    release = afanet_to_release(state, prefix)
    assert release_prefix(release) == prefix
    assert release[f"{prefix}attn_proj.weight"] is state["affinity_head.proj.weight"]
    back = afanet_from_release(release)
    assert back.keys() == state.keys() and all(back[key] is state[key] for key in state)


def test_release_network_gives_its_encoder_to_pretrained(tmp_path, b0):
    torch.manual_seed(0)
    model = AFANet(num_classes=21, backbone="mit_b0")
    torch.save(afanet_to_release(model.state_dict()), tmp_path / "wetr_iter_20000.pth")
    assert "AFA checkpoint" in load_pretrained(b0, tmp_path / "wetr_iter_20000.pth")
    assert all(torch.equal(value, model.encoder.state_dict()[key]) for key, value in b0.state_dict().items())


def test_release_layout_is_not_guessed():
    torch.manual_seed(0)
    state = AFANet(num_classes=6, backbone="mit_b0").state_dict()  # our names: no attn_proj
    assert release_prefix(state) is None and release_prefix(mit_b0().state_dict()) is None
    with pytest.raises(ValueError, match="attn_proj"):
        afanet_from_release(state)


# ---------------------------------------------------------------- ViT layouts

@pytest.mark.parametrize("wrapper", [None, "model"])
def test_timm_vit_layout_loads_strictly(tmp_path, tiny, wrapper):
    state = random_state(timm_vit_shapes(192))  # deit_tiny_patch16_224: DeiT-Ti/16 at 224 pixels
    torch.save(state if wrapper is None else {wrapper: state}, tmp_path / "deit_tiny.pth")
    description = load_pretrained(tiny, tmp_path / "deit_tiny.pth")
    assert "timm/DeiT ViT" in description and "vit_tiny16" in description and "resized" not in description
    for key, value in tiny.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_timm_vit_fc_norm_is_dropped_with_the_head(tmp_path):
    """fc_norm (timm's LayerNorm of the pooled token before the head) is part of the classifier:
    the file loads, into the same encoder as without those keys."""
    state = random_state(timm_vit_shapes(192))
    torch.save(state, tmp_path / "plain.pth")
    generator = torch.Generator().manual_seed(7)
    with_fc_norm = {**state, "fc_norm.weight": torch.randn(192, generator=generator),
                    "fc_norm.bias": torch.randn(192, generator=generator)}
    torch.save(with_fc_norm, tmp_path / "fc_norm.pth")
    torch.manual_seed(1)
    plain, loaded = vit_tiny16(), vit_tiny16()
    load_pretrained(plain, tmp_path / "plain.pth")
    description = load_pretrained(loaded, tmp_path / "fc_norm.pth")
    assert "fc_norm.*" in description and "head.*" in description
    assert plain.state_dict().keys() == loaded.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_timm_vit_with_average_pooling_and_no_final_norm_is_one_line(tmp_path, tiny):
    """timm's global_pool="avg" ViTs have fc_norm in place of the final per-token norm."""
    state = random_state(timm_vit_shapes(192))
    state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
    torch.save(state, tmp_path / "vit_avg.pth")
    with pytest.raises(ValueError) as excinfo:
        load_pretrained(tiny, tmp_path / "vit_avg.pth")
    message = error_line(excinfo)
    assert "vit_avg.pth" in message and "average pooling" in message and "deit_" in message


def test_timm_vit_at_384_pixels_gets_its_position_embedding_resized(tmp_path, tiny):
    state = random_state(timm_vit_shapes(192, grid=24))  # a 384-pixel fine-tune: 24 × 24 grid
    torch.save(state, tmp_path / "vit_384.pth")
    assert "resized from 24×24 to 14×14" in load_pretrained(tiny, tmp_path / "vit_384.pth")
    assert torch.equal(tiny.pos_embed[:, 0], state["pos_embed"][:, 0])  # class token kept
    assert torch.equal(tiny.pos_embed, resample_position_embedding(state["pos_embed"], (24, 24), (14, 14)))


def test_timm_vit_s16_shapes_are_ours():
    from vit import vit_s16
    with torch.device("meta"):
        ours = vit_s16().state_dict()
    shapes = timm_vit_shapes(384)
    del shapes["head.weight"], shapes["head.bias"]
    assert {key: tuple(value.shape) for key, value in ours.items()} == shapes
    assert describe_state(ours) == "vit_s16"


def test_hf_vit_layout_loads_strictly(tmp_path, tiny):
    state = random_state(hf_vit_shapes(192))
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert "Hugging Face ViT" in load_pretrained(tiny, tmp_path / "pytorch_model.bin")
    ours, layer = tiny.state_dict(), "vit.encoder.layer.3."
    assert torch.equal(ours["blocks.3.attn.qkv.weight"], torch.cat(
        [state[f"{layer}attention.attention.{p}.weight"] for p in ("query", "key", "value")]))
    assert torch.equal(ours["blocks.3.attn.proj.weight"], state[f"{layer}attention.output.dense.weight"])
    assert torch.equal(ours["blocks.3.norm1.bias"], state[f"{layer}layernorm_before.bias"])
    assert torch.equal(ours["blocks.3.norm2.weight"], state[f"{layer}layernorm_after.weight"])
    assert torch.equal(ours["blocks.3.mlp.fc1.weight"], state[f"{layer}intermediate.dense.weight"])
    assert torch.equal(ours["blocks.3.mlp.fc2.bias"], state[f"{layer}output.dense.bias"])
    assert torch.equal(ours["cls_token"], state["vit.embeddings.cls_token"])
    assert torch.equal(ours["pos_embed"], state["vit.embeddings.position_embeddings"])
    assert torch.equal(ours["norm.weight"], state["vit.layernorm.weight"])


# ---------------------------------------------------------------- safetensors

def write_safetensors(state, path):
    """The safetensors format by hand: 8-byte little-endian header length, JSON header, raw data."""
    import json
    header, chunks, offset = {}, [], 0
    for key, tensor in state.items():
        data = tensor.contiguous().numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks))


def test_safetensors_without_the_package_says_how_to_install(tmp_path, b0, monkeypatch):
    write_safetensors(random_state(hf_segformer_shapes(**MIT_B0)), tmp_path / "model.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ValueError) as excinfo:
        load_pretrained(b0, tmp_path / "model.safetensors")
    message = error_line(excinfo)
    assert "model.safetensors" in message and "pip install safetensors" in message
    (tmp_path / "renamed.bin").write_bytes((tmp_path / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="pip install safetensors"):  # recognised by content too
        load_pretrained(b0, tmp_path / "renamed.bin")


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="safetensors is not installed")
def test_safetensors_files_load(tmp_path, b0, tiny):
    state = random_state(hf_segformer_shapes(**MIT_B0))
    write_safetensors(state, tmp_path / "model.safetensors")
    assert "Hugging Face SegFormer" in load_pretrained(b0, tmp_path / "model.safetensors")
    assert torch.equal(b0.state_dict()["block2.0.attn.q.bias"],
                       state["segformer.encoder.block.1.0.attention.self.query.bias"])
    from safetensors.torch import save_file
    vit_state = random_state(timm_vit_shapes(192))
    save_file(vit_state, str(tmp_path / "timm.safetensors"))
    load_pretrained(tiny, tmp_path / "timm.safetensors")
    assert torch.equal(tiny.state_dict()["blocks.0.attn.qkv.weight"], vit_state["blocks.0.attn.qkv.weight"])


# ---------------------------------------------------------------- clear errors

@pytest.mark.parametrize("content, expected", [
    (b"hello world\n", "it is a text file, not a checkpoint (it begins 'hello world')"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 14\n", "git lfs pull"),
    (b"<!DOCTYPE html>\n<html><body>Sign in</body></html>", "an HTML page"),
    (b'{"architectures": ["SegformerForImageClassification"]}', "a JSON file"),
    (b"", "the file is empty"),
    (b"\x89HDF\r\n\x1a\n" + bytes(64), "HDF5"),
    (bytes(range(256)) * 4, "not a PyTorch checkpoint"),
])
def test_foreign_files_give_one_clean_line(tmp_path, b0, content, expected):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError) as excinfo:
        load_pretrained(b0, path)
    message = error_line(excinfo)
    assert message.startswith(f"cannot read MiT weights from {path}") and expected in message
    assert not message.rstrip(")").endswith(": 101")


def test_numpy_archive_is_named(tmp_path, b0):
    import numpy as np
    np.savez(tmp_path / "ViT-B_16.npz", **{"Transformer/encoder_norm/scale": np.ones(3)})
    with pytest.raises(ValueError) as excinfo:
        load_pretrained(b0, tmp_path / "ViT-B_16.npz")
    assert "NumPy archive" in error_line(excinfo)


def test_truncated_and_unsafe_checkpoints(tmp_path, b0, b0_state):
    torch.save(b0_state, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as excinfo:
        load_pretrained(b0, tmp_path / "truncated.pth")
    assert "truncated" in error_line(excinfo) and "truncated.pth" in str(excinfo.value)
    torch.save({"model": {}, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "with_args.pth")
    with pytest.raises(ValueError) as excinfo:
        load_pretrained(b0, tmp_path / "with_args.pth")
    assert "argparse.Namespace" in error_line(excinfo) and "weights_only=False" in str(excinfo.value)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_pretrained(b0, tmp_path / "absent.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state dict of tensors"):
        load_pretrained(b0, tmp_path / "list.pth")


def test_other_architecture_says_what_it_is(tmp_path, b0):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
              "fc.weight": torch.zeros(1000, 2048)}
    torch.save(resnet, tmp_path / "resnet50.pth")
    with pytest.raises(ValueError) as excinfo:
        load_pretrained(b0, tmp_path / "resnet50.pth")
    message = error_line(excinfo)
    assert "a ResNet" in message and "--backbone" in message and "resnet50.pth" in message


def expanded(shapes):
    """Tensors of the right shapes that take no room on disk (one stored element each)."""
    return {key: torch.zeros(1).expand(shape) if len(shape) else torch.zeros(()) for key, shape in shapes.items()}


@pytest.mark.parametrize("file_shapes, encoder, backbone", [
    (timm_vit_shapes(384), "b0", "vit_s16"),  # a ViT-S/16 file for a MiT
    (timm_vit_shapes(768), "tiny", "vit_b16"),  # a ViT-B/16 file for a smaller ViT
    (hf_segformer_shapes(**MIT_B1), "b0", "mit_b1"),  # a MiT-B1 file for MiT-B0
    (hf_segformer_shapes(**MIT_B0), "tiny", "mit_b0"),  # a MiT file for a ViT
])
def test_file_for_another_backbone_names_it(tmp_path, request, file_shapes, encoder, backbone):
    torch.save(expanded(file_shapes), tmp_path / "weights.bin")
    with pytest.raises(ValueError) as excinfo:
        load_pretrained(request.getfixturevalue(encoder), tmp_path / "weights.bin")
    message = error_line(excinfo)
    assert "weights.bin" in message and f"--backbone {backbone}" in message


def test_unknown_vit_and_distilled_deit_are_explained(tmp_path, tiny):
    torch.save(expanded(timm_vit_shapes(384, patch=8, grid=28)), tmp_path / "dino_vits8.pth")
    with pytest.raises(ValueError) as excinfo:
        load_pretrained(tiny, tmp_path / "dino_vits8.pth")
    assert "a ViT 384 wide with 12 blocks and patch 8" in error_line(excinfo)
    assert "none of this project's backbones" in str(excinfo.value)
    distilled = dict(timm_vit_shapes(192), dist_token=(1, 1, 192), pos_embed=(1, 198, 192),
                     **{"head_dist.weight": (1000, 192), "head_dist.bias": (1000,)})
    torch.save(expanded(distilled), tmp_path / "deit_tiny_distilled.pth")
    with pytest.raises(ValueError) as excinfo:
        load_pretrained(tiny, tmp_path / "deit_tiny_distilled.pth")
    assert "distilled DeiT" in error_line(excinfo)


def test_renamed_key_is_reported_by_name(tmp_path, b0, b0_state):
    state = dict(b0_state)
    state["block2.0.attn.query.weight"] = state.pop("block2.0.attn.q.weight")
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(ValueError) as excinfo:
        load_pretrained(b0, tmp_path / "renamed.pth")
    message = error_line(excinfo)
    assert "block2.0.attn.q.weight" in message and "block2.0.attn.query.weight" in message


def test_read_state_dict_unwraps(tmp_path):
    state = {"a.weight": torch.ones(2)}
    for wrapper in ("state_dict", "model"):
        torch.save({wrapper: state, "epoch": 3}, tmp_path / f"{wrapper}.pth")
        assert read_state_dict(tmp_path / f"{wrapper}.pth").keys() == state.keys()


def test_vit_encoder_with_custom_sizes_is_described():
    encoder = VisionTransformer(embed_dim=64, depth=4, num_heads=2)
    assert describe_state(encoder.state_dict()) == "a ViT 64 wide with 4 blocks and patch 16"


def test_missing_weights_file_says_where_to_download_it(tmp_path, b0, tiny):
    with pytest.raises(FileNotFoundError) as excinfo:
        load_pretrained(b0, tmp_path / "mit_b1.pth")
    assert "mit_b1.pth" in error_line(excinfo) and "github.com/NVlabs/SegFormer" in error_line(excinfo)
    with pytest.raises(FileNotFoundError) as excinfo:
        load_pretrained(tiny, tmp_path / "deit.pth")
    assert "deit_small_patch16_224" in error_line(excinfo)
