"""Tests for the propagation with the raw attention (paper Table 4, "AFA (prop. with MHSA)"):
attention with object structure must carry a partial CAM over its object through the whole label
chain (MHSA affinity → random walk at both thresholds → PAR → AFA label). And pipeline.py's
settings of the chain: read once from a config, unknown choices refused."""
import math
from types import SimpleNamespace

import pytest
import torch

from attention_affinity import mhsa_affinity, window_mask
from cam import refine_propagated_with_par
from model import AFANet
from par import PAR
from pipeline import LabelSettings, make_pseudo_labels
from random_walk import propagate, random_walk_cams

SIZE, STRIDE = 128, 16                     # a 128 × 128 image on the 8 × 8 token grid
GRID = SIZE // STRIDE
CLASS = 3                                  # the object's class id (foreground channel CLASS - 1)
NUM_FG = 5                                 # foreground classes, C - 1
LOW, HIGH, RADIUS = 0.35, 0.55, 8          # the paper's thresholds and window
HEADS, BLOCKS, HEAD_DIM = 8, 2, 32         # mit_b0's last stage: 8 heads of width 32, 2 blocks


def scene():
    """An object of 4 × 4 tokens on a grey background, and a CAM that covers only three
    quarters of it (the bottom-right quarter, a 2 × 2-token corner, is missed)."""
    object_tokens = torch.zeros(GRID, GRID, dtype=torch.bool)
    object_tokens[2:6, 2:6] = True                                          # (h, w)
    object_pixels = object_tokens.repeat_interleave(STRIDE, 0).repeat_interleave(STRIDE, 1)  # (H, W)
    pixels = torch.full((1, 3, SIZE, SIZE), 0.5)                            # (1, 3, H, W) in [0, 1]
    pixels[0, 0][object_pixels], pixels[0, 1][object_pixels] = 0.9, 0.2
    missed = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    missed[4 * STRIDE:6 * STRIDE, 4 * STRIDE:6 * STRIDE] = True             # (H, W) the corner
    cams = torch.zeros(1, NUM_FG, SIZE, SIZE)                               # (1, C-1, H, W)
    cams[0, CLASS - 1][object_pixels & ~missed] = 1.0
    cls_labels = torch.zeros(1, NUM_FG)
    cls_labels[0, CLASS - 1] = 1
    return object_tokens, object_pixels, missed, pixels, cams, cls_labels


def attention_logits(object_tokens, logit_gap):
    """Pre-softmax, unscaled logits q·kᵀ of BLOCKS blocks × HEADS heads, each (1, nh, N, N): every
    query scores the keys of its own region (object or background) `logit_gap` higher after the
    1/√d scaling, so each softmax row sums to 1 and puts its mass on the query's own region."""
    region = object_tokens.flatten()                                        # (N,)
    same_region = region[:, None] == region[None, :]                        # (N, N)
    logits = same_region.float() * logit_gap * math.sqrt(HEAD_DIM)         # (N, N)
    return [logits.expand(1, HEADS, *logits.shape).clone() for _ in range(BLOCKS)]


def label_through_the_chain(logits, pixels, cams, cls_labels):
    affinity = mhsa_affinity(logits, HEAD_DIM)                              # (1, N, N)
    mask = window_mask(GRID, GRID, RADIUS)                                  # (N, N)
    walked = [random_walk_cams(cams, affinity, cls_labels, (GRID, GRID), mask, t)
              for t in (LOW, HIGH)]                                         # 2 × (1, C, H, W)
    return refine_propagated_with_par(PAR(), pixels, *walked, cls_labels, None)[0]  # (H, W)


def test_attention_with_object_structure_recovers_the_object():
    object_tokens, object_pixels, missed, pixels, cams, cls_labels = scene()
    logits = attention_logits(object_tokens, logit_gap=5.0)
    softmax = (logits[0] / math.sqrt(HEAD_DIM)).softmax(dim=-1)             # (1, nh, N, N)
    own = object_tokens.flatten()[:, None] == object_tokens.flatten()[None, :]
    assert torch.allclose(softmax.sum(-1), torch.ones(1, HEADS, GRID * GRID))
    assert (softmax[0, 0] * own).sum(-1).min() > 0.95                      # sharp, softmax-sized
    label = label_through_the_chain(logits, pixels, cams, cls_labels)      # (H, W)
    on_object = (label[object_pixels] == CLASS).float().mean()
    on_missed_part = (label[missed] == CLASS).float().mean()
    on_background = (label[~object_pixels] == 0).float().mean()
    assert on_object > 0.95 and on_missed_part > 0.95 and on_background > 0.95


@pytest.mark.parametrize("logit_gap", [0.0, -5.0])
def test_attention_without_object_structure_does_not(logit_gap):
    """The same chain with rows spread evenly over the image (gap 0), or concentrated on the
    other region (gap −5): the missed corner stays background. (The check above can fail.)"""
    object_tokens, object_pixels, missed, pixels, cams, cls_labels = scene()
    label = label_through_the_chain(attention_logits(object_tokens, logit_gap), pixels, cams,
                                    cls_labels)                             # (H, W)
    assert (label[missed] == CLASS).float().mean() < 0.5


@pytest.mark.parametrize("factor", [0.01, 10.0, float(GRID * GRID)])
def test_a_constant_factor_on_the_mhsa_affinity_keeps_the_walks_arg_max(factor):
    """Column j of the transition is divided by (its sum + 0.1): a factor on the affinity changes
    how much of pixel j's mass is kept, the same for all its classes, so on the grid the walk's
    arg-max stays (softmax-sized values are not what makes a walk fail)."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, HEADS, GRID * GRID, GRID * GRID, generator=g) * 20
              for _ in range(BLOCKS)]
    affinity = mhsa_affinity(logits, HEAD_DIM)                              # (2, N, N)
    cams = torch.rand(2, NUM_FG, GRID, GRID, generator=g)                   # (2, C-1, h, w)
    cls_labels = (torch.rand(2, NUM_FG, generator=g) > 0.5).float()
    mask = window_mask(GRID, GRID, 3)                                       # (N, N)
    walked = propagate(cams, affinity, mask, cls_labels, LOW)               # (2, C, h, w)
    scaled = propagate(cams, affinity * factor, mask, cls_labels, LOW)      # (2, C, h, w)
    assert torch.equal(walked.argmax(1), scaled.argmax(1))


def test_label_settings_are_read_once_from_a_config():
    cfg = SimpleNamespace(cam_scales=[1.0, 1.5], low=0.3, high=0.6, bkg_score=0.4, radius=5,
                          propagate_with="attention", cam_bf16=True, cam_bn_stats=False,
                          reuse_forward_cam=True, speed_paths=False, lr=1e-3)  # others unread
    settings = LabelSettings.from_config(cfg, AFANet(3, backbone="mit_b0"))
    assert settings == LabelSettings(
        cam_scales=(1.0, 1.5), low=0.3, high=0.6, bkg_score=0.4, radius=5,
        propagate_with="attention", cam_bf16=True, cam_bn_stats=False, reuse_forward_cam=True)
    assert settings.for_evaluation("forward") == LabelSettings(
        cam_scales=(1.0, 1.5), low=0.3, high=0.6, bkg_score=0.4, radius=5,
        propagate_with="attention", thresholds="eval", affinity_from="forward")
    with pytest.raises(ValueError, match="propagate_with"):
        LabelSettings(propagate_with="mhsa")


@pytest.mark.parametrize("options, message", [({"need": ("seg",)}, "need"),
                                              ({"thresholds": "test"}, "thresholds"),
                                              ({"affinity_from": "cam"}, "affinity_from")])
def test_the_chain_rejects_unknown_choices(options, message):
    batch = {"image": torch.zeros(1, 3, 32, 32), "cls_labels": torch.ones(1, 5)}
    with pytest.raises(ValueError, match=message):
        need = options.pop("need", ("par", "afa"))  # the others are settings
        make_pseudo_labels(None, None, batch, LabelSettings(**options), need=need)
