"""Tests for attention_affinity.py: window mask, AFA head, affinity labels, loss (paper §3.2)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from attention_affinity import AffinityHead, affinity_labels, affinity_loss, window_mask
from reference import naive_window_mask

GOLDEN = Path(__file__).parent / "golden"
IGNORE = 255


# ---------------------------------------------------------------- naive references (slow loops)

def naive_affinity_labels(pseudo_label, grid, mask, ignore_index=IGNORE):
    """Pair-by-pair labels; nearest downsampling as floor(dst · in / out) in exact integers
    (valid for the exact ratios used here, where PyTorch's float scale is exact too)."""
    B, H, W = pseudo_label.shape
    h, w = grid
    small = torch.empty(B, h, w, dtype=torch.long)
    for b in range(B):
        for y in range(h):
            for x in range(w):
                small[b, y, x] = pseudo_label[b, (y * H) // h, (x * W) // w]
    flat = small.view(B, h * w)
    out = torch.empty(B, h * w, h * w, dtype=torch.long)
    for b in range(B):
        for i in range(h * w):
            for j in range(h * w):
                li, lj = int(flat[b, i]), int(flat[b, j])
                outside = mask is not None and not mask[i, j]
                if li == ignore_index or lj == ignore_index or outside:
                    out[b, i, j] = ignore_index
                else:
                    out[b, i, j] = int(li == lj)
    return out


def random_pseudo_label(B, H, W, classes=(0, 3, 7, IGNORE), seed=0):
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(classes), (B, H, W), generator=generator)
    return torch.tensor(classes)[index]


# ---------------------------------------------------------------- window_mask

@pytest.mark.parametrize("h, w, radius", [(1, 1, 0), (3, 5, 1), (6, 7, 3), (5, 9, 2), (9, 4, 2),
                                          (4, 4, 8), (7, 3, 0), (8, 8, 8)])
def test_window_mask_matches_naive_loop(h, w, radius):
    mask = window_mask(h, w, radius)
    assert mask.dtype == torch.bool and mask.shape == (h * w, h * w)
    assert torch.equal(mask, naive_window_mask(h, w, radius))


def test_window_mask_symmetric_with_true_diagonal_and_known_counts():
    mask = window_mask(10, 12, radius=2)
    assert torch.equal(mask, mask.T)
    assert mask.diagonal().all()
    # an interior cell sees the full 5 × 5 square, a corner cell a 3 × 3 one
    assert mask[5 * 12 + 6].sum() == 25
    assert mask[0].sum() == 9
    assert torch.equal(window_mask(4, 5, radius=0), torch.eye(20, dtype=torch.bool))
    assert window_mask(4, 5, radius=4).all()


def test_window_mask_cache_cannot_be_corrupted():
    first = window_mask(5, 6, radius=1)
    first.fill_(False)
    again = window_mask(5, 6, radius=1)
    assert torch.equal(again, naive_window_mask(5, 6, 1))
    assert window_mask(5, 6, radius=1, device="cpu").device.type == "cpu"


@pytest.mark.parametrize("args", [(0, 4, 1), (4, -1, 1), (4, 4, -1), (4.0, 4, 1)])
def test_window_mask_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        window_mask(*args)


# ---------------------------------------------------------------- AffinityHead

def test_affinity_head_shape_range_symmetry():
    torch.manual_seed(0)
    head = AffinityHead(num_maps=16)
    attn_logits = torch.randn(2, 16, 30, 30)
    affinity = head(attn_logits)
    assert affinity.shape == (2, 30, 30)
    assert ((affinity > 0) & (affinity < 1)).all()  # float32 saturates only for |logit| > ~17
    assert affinity.min() < 0.1 and affinity.max() > 0.9  # a spread, not a constant
    assert torch.allclose(affinity, affinity.transpose(1, 2), rtol=1e-6, atol=1e-7)
    # the input itself is far from symmetric: the symmetry comes from S = A + Aᵀ
    assert not torch.allclose(attn_logits, attn_logits.transpose(-2, -1), atol=1e-1)


def test_affinity_head_matches_formula():
    torch.manual_seed(1)
    head = AffinityHead(num_maps=4)
    attn_logits = torch.randn(3, 4, 9, 9)
    symmetric = attn_logits + attn_logits.transpose(-2, -1)
    weight, bias = head.proj.weight.view(4), head.proj.bias
    expected = torch.sigmoid(torch.einsum("bkij,k->bij", symmetric, weight) + bias)
    assert torch.allclose(head(attn_logits), expected, rtol=1e-5, atol=1e-6)


def test_affinity_head_gradient_reaches_conv_and_attention():
    torch.manual_seed(2)
    head = AffinityHead(num_maps=6)
    attn_logits = torch.randn(2, 6, 12, 12, requires_grad=True)
    affinity = head(attn_logits)
    labels = affinity_labels(random_pseudo_label(2, 48, 48, seed=2), (3, 4), window_mask(3, 4, 1))
    affinity_loss(affinity, labels).backward()
    for param in head.parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0
    assert attn_logits.grad is not None and attn_logits.grad.abs().sum() > 0


def test_affinity_head_init_is_kaiming_normal_fan_out():
    # kaiming_normal_(a=√5, mode="fan_out") on a 1×1 conv with one output: std = √(2/(1+5)) / √1
    torch.manual_seed(3)
    weight = AffinityHead(num_maps=20000).proj.weight
    assert abs(weight.mean().item()) < 0.02
    assert abs(weight.std().item() - math.sqrt(1 / 3)) < 0.02


def test_affinity_head_rejects_wrong_shape():
    head = AffinityHead(num_maps=16)
    with pytest.raises(ValueError, match="attn_logits"):
        head(torch.randn(2, 8, 10, 10))
    with pytest.raises(ValueError, match="attn_logits"):
        head(torch.randn(2, 16, 10, 11))


# ---------------------------------------------------------------- affinity_labels

def test_affinity_labels_golden():
    golden = np.load(GOLDEN / "affinity.npz")
    h, w = (int(v) for v in golden["grid"])
    mask = window_mask(h, w, radius=3)
    assert torch.equal(mask, torch.from_numpy(golden["mask"]))
    labels = affinity_labels(torch.from_numpy(golden["pseudo_label"]), (h, w), mask)
    assert labels.dtype == torch.int64
    assert torch.equal(labels, torch.from_numpy(golden["labels"]))


@pytest.mark.parametrize("H, W, h, w, radius",
                         [(24, 32, 3, 4, 1), (13, 20, 4, 5, 2), (16, 16, 4, 4, 8)])
def test_affinity_labels_match_naive_loop(H, W, h, w, radius):
    pseudo_label = random_pseudo_label(2, H, W, seed=H)
    mask = window_mask(h, w, radius)
    expected = naive_affinity_labels(pseudo_label, (h, w), mask)
    assert torch.equal(affinity_labels(pseudo_label, (h, w), mask), expected)
    assert torch.equal(affinity_labels(pseudo_label, (h, w), None),
                       naive_affinity_labels(pseudo_label, (h, w), None))


def test_affinity_labels_invariants():
    pseudo_label = random_pseudo_label(3, 96, 112, seed=4)
    h, w = 6, 7
    mask = window_mask(h, w, radius=2)
    labels = affinity_labels(pseudo_label, (h, w), mask)
    assert labels.shape == (3, h * w, h * w)
    assert set(labels.unique().tolist()) == {0, 1, IGNORE}
    assert torch.equal(labels, labels.transpose(1, 2))
    assert (labels[:, ~mask] == IGNORE).all()

    grid_label = pseudo_label[:, ::16, ::16].reshape(3, h * w)  # exact ratio 16: nearest = top-left
    ignored = grid_label == IGNORE
    assert ignored.any() and (~ignored).any()
    for b in range(3):
        assert (labels[b][ignored[b]] == IGNORE).all()  # rows of ignored pixels
        assert (labels[b][:, ignored[b]] == IGNORE).all()  # columns of ignored pixels
        diagonal = labels[b].diagonal()
        assert (diagonal[~ignored[b]] == 1).all() and (diagonal[ignored[b]] == IGNORE).all()


def test_affinity_labels_known_answer():
    # 1 × 2 grid from a 16 × 32 label: left cell class 0, right cell class 5
    pseudo_label = torch.zeros(1, 16, 32, dtype=torch.long)
    pseudo_label[:, :, 16:] = 5
    labels = affinity_labels(pseudo_label, (1, 2), window_mask(1, 2, radius=1))
    assert torch.equal(labels, torch.tensor([[[1, 0], [0, 1]]]))
    labels = affinity_labels(pseudo_label, (1, 2), window_mask(1, 2, radius=0))
    assert torch.equal(labels, torch.tensor([[[1, IGNORE], [IGNORE, 1]]]))
    pseudo_label[:, :, 16:] = IGNORE
    labels = affinity_labels(pseudo_label, (1, 2), None)
    assert torch.equal(labels, torch.tensor([[[1, IGNORE], [IGNORE, IGNORE]]]))


def test_affinity_labels_rejects_bad_input():
    pseudo_label = torch.zeros(2, 32, 32, dtype=torch.long)
    with pytest.raises(ValueError, match="pseudo_label"):
        affinity_labels(pseudo_label[0], (2, 2), window_mask(2, 2, 1))
    with pytest.raises(ValueError, match="mask"):
        affinity_labels(pseudo_label, (2, 2), window_mask(3, 3, 1))
    with pytest.raises(ValueError, match="mask"):
        affinity_labels(pseudo_label, (2, 2), window_mask(2, 2, 1).float())
    with pytest.raises(ValueError, match="grid"):
        affinity_labels(pseudo_label, (2, 2, 2), None)


# ---------------------------------------------------------------- affinity_loss

def test_affinity_loss_golden():
    golden = np.load(GOLDEN / "affinity.npz")
    loss = affinity_loss(torch.from_numpy(golden["affinity"]), torch.from_numpy(golden["labels"]))
    expected = float(golden["loss"])
    assert loss.dim() == 0
    assert abs(loss.item() - expected) <= 1e-5 * abs(expected)


def test_affinity_loss_known_answer():
    labels = torch.tensor([[[1, 0], [IGNORE, 1]]])
    affinity = torch.tensor([[[0.8, 0.3], [0.9, 0.6]]])
    # positives (0.8, 0.6): Σ(1 − a) = 0.6 over 2 + 1; negative (0.3): 0.3 over 1 + 1
    expected = 0.5 * 0.6 / 3 + 0.5 * 0.3 / 2
    assert affinity_loss(affinity, labels).item() == pytest.approx(expected, rel=1e-6)


def test_affinity_loss_zero_on_perfect_prediction():
    pseudo_label = random_pseudo_label(2, 64, 80, seed=5)
    labels = affinity_labels(pseudo_label, (4, 5), window_mask(4, 5, radius=1))
    valid = labels != IGNORE
    affinity = torch.where(valid, labels.float(), torch.rand(labels.shape))
    assert affinity_loss(affinity, labels).item() == 0.0
    # and strictly positive as soon as one valid pair is wrong
    affinity[valid.nonzero()[0].unbind()] = 0.5
    assert affinity_loss(affinity, labels).item() > 0


def test_affinity_loss_finite_when_everything_is_ignored():
    affinity = torch.rand(2, 9, 9, requires_grad=True)
    labels = torch.full((2, 9, 9), IGNORE)
    loss = affinity_loss(affinity, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(affinity.grad).all()
    # only positives (no negatives) and only negatives stay finite too
    assert torch.isfinite(affinity_loss(affinity, torch.ones(2, 9, 9, dtype=torch.long)))
    assert torch.isfinite(affinity_loss(affinity, torch.zeros(2, 9, 9, dtype=torch.long)))


def test_affinity_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="affinity"):
        affinity_loss(torch.rand(2, 9, 9), torch.zeros(2, 9, 8, dtype=torch.long))
