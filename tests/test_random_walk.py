"""Tests for random_walk.py: one random-walk step of the CAMs along the affinity (paper §3.2)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from random_walk import propagate
from reference import naive_window_mask

GOLDEN = Path(__file__).parent / "golden"


# ---------------------------------------------------------------- naive reference

def naive_propagate(cams, affinity, mask, cls_labels, bkg_score, power=2, column_offset=0.1):
    """Per image: keep background + present channels, softmax, walk with explicit sums."""
    B, num_fg, h, w = cams.shape
    N = h * w
    out = torch.zeros(B, num_fg + 1, N, dtype=torch.float64)
    for b in range(B):
        scores = torch.cat([torch.full((1, N), float(bkg_score)), cams[b].reshape(num_fg, N)])
        keep = [0] + [k + 1 for k in range(num_fg) if cls_labels[b, k] != 0]
        probs = scores[keep].double().softmax(dim=0)  # (K, N)
        weight = affinity[b].double() ** power  # (N, N)
        if mask is not None:
            weight = weight * mask.double()
        for j in range(N):
            column = weight[:, j] / (weight[:, j].sum() + column_offset)
            out[b, keep, j] = (probs * column).sum(dim=1)
    return out.view(B, num_fg + 1, h, w).float()


def random_inputs(B=3, num_fg=6, h=4, w=5, seed=0, symmetric=True):
    generator = torch.Generator().manual_seed(seed)
    N = h * w
    cams = torch.rand(B, num_fg, h, w, generator=generator)
    raw = torch.rand(B, N, N, generator=generator)
    affinity = (raw + raw.transpose(1, 2)) / 2 if symmetric else raw
    cls_labels = (torch.rand(B, num_fg, generator=generator) < 0.4).float()
    cls_labels[0] = 0  # one image with no foreground class at all
    cls_labels[1, 0] = 1
    cams = cams * cls_labels[:, :, None, None]  # label-masked, as the training step passes them
    return cams, affinity, cls_labels


# ---------------------------------------------------------------- golden parity

@pytest.mark.parametrize("bkg_score, key", [(0.35, "out_035"), (0.55, "out_055")])
def test_propagate_golden(bkg_score, key):
    golden = np.load(GOLDEN / "propagate.npz")
    h, w = golden["cams"].shape[-2:]
    mask = torch.from_numpy(golden["mask"])
    assert torch.equal(mask, naive_window_mask(h, w, int(golden["radius"])))
    affinity = torch.from_numpy(golden["affinity"])
    affinity_before = affinity.clone()
    out = propagate(torch.from_numpy(golden["cams"]), affinity, mask,
                    torch.from_numpy(golden["cls_labels"]), bkg_score)
    expected = torch.from_numpy(golden[key])
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(affinity, affinity_before)  # the release edits it in place; we must not


# ---------------------------------------------------------------- naive reference and known answers

@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("power", [1, 2, 3])
@pytest.mark.parametrize("radius", [None, 0, 1, 3])
def test_propagate_matches_naive_reference(power, radius, symmetric):
    # an asymmetric affinity pins down the orientation: column j of T feeds output pixel j
    cams, affinity, cls_labels = random_inputs(seed=power, symmetric=symmetric)
    mask = None if radius is None else naive_window_mask(4, 5, radius)
    out = propagate(cams, affinity, mask, cls_labels, 0.45, power=power)
    expected = naive_propagate(cams, affinity, mask, cls_labels, 0.45, power=power)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("power", [1, 2, 3.5])
@pytest.mark.parametrize("with_mask", [True, False])
def test_identity_affinity_keeps_softmaxed_cams(power, with_mask):
    # T = I^power = I; each column sums to 1, so T = I / (1 + 0.1) and the output is P / 1.1
    cams, _, cls_labels = random_inputs(seed=7)
    B, num_fg, h, w = cams.shape
    affinity = torch.eye(h * w).expand(B, -1, -1)
    mask = naive_window_mask(h, w, 1) if with_mask else None
    out = propagate(cams, affinity, mask, cls_labels, bkg_score=0.4, power=power)

    expected = torch.zeros(B, num_fg + 1, h, w)
    for b in range(B):
        keep = [0] + [k + 1 for k in range(num_fg) if cls_labels[b, k] != 0]
        scores = torch.cat([torch.full((1, h, w), 0.4), cams[b]])[keep]
        expected[b, keep] = scores.softmax(dim=0) / (1 + 0.1)
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_no_foreground_class_gives_background_column_mass():
    # P = 1 on background only, so background_j = Σ_i T_ij = s_j / (s_j + 0.1), s_j = Σ_i a_ij²
    cams, affinity, _ = random_inputs(seed=8)
    cls_labels = torch.zeros(cams.shape[:2])
    mask = naive_window_mask(4, 5, 1)
    out = propagate(cams, affinity, mask, cls_labels, bkg_score=0.35)
    column_sum = ((affinity ** 2) * mask).sum(dim=1)  # (B, N)
    assert torch.allclose(out[:, 0].flatten(1), column_sum / (column_sum + 0.1), rtol=1e-6)
    assert (out[:, 1:] == 0).all()


def test_absent_classes_are_exactly_zero_and_background_first():
    cams, affinity, cls_labels = random_inputs(seed=9)
    cams = cams + 1  # absent classes now carry large scores the function must still drop
    out = propagate(cams, affinity, naive_window_mask(4, 5, 2), cls_labels, bkg_score=0.55)
    assert out.shape == (3, 7, 4, 5)
    absent = torch.cat([torch.zeros(3, 1, dtype=torch.bool), cls_labels == 0], dim=1)
    assert (out[absent] == 0).all()
    assert (out[~absent] > 0).all()
    # background is channel 0: raising bkg_score raises it wherever a class competes with it,
    # and changes nothing in image 0, which has background only
    higher = propagate(cams, affinity, naive_window_mask(4, 5, 2), cls_labels, bkg_score=5.0)
    assert (higher[1:, 0] > out[1:, 0]).all()
    assert torch.equal(higher[0], out[0])


def test_pixels_outside_the_window_do_not_contribute():
    cams, affinity, cls_labels = random_inputs(seed=10)
    h, w = cams.shape[-2:]
    mask = naive_window_mask(h, w, 1)
    out = propagate(cams, affinity, mask, cls_labels, bkg_score=0.35)
    changed = cams.clone()
    changed[:, :, 0, 0] += 3  # cell 0 is the top-left corner
    out_changed = propagate(changed, affinity, mask, cls_labels, bkg_score=0.35)
    outside = ~mask[0].view(h, w)
    assert torch.equal(out[..., outside], out_changed[..., outside])
    assert not torch.allclose(out[1, ..., 0, 0], out_changed[1, ..., 0, 0])


def test_no_mask_equals_all_true_mask():
    cams, affinity, cls_labels = random_inputs(seed=11)
    everything = torch.ones(20, 20, dtype=torch.bool)
    without = propagate(cams, affinity, None, cls_labels, 0.35)
    with_all = propagate(cams, affinity, everything, cls_labels, 0.35)
    assert torch.allclose(without, with_all, rtol=1e-6, atol=0)


def test_batch_equals_per_image():
    cams, affinity, cls_labels = random_inputs(B=4, seed=12)
    mask = naive_window_mask(4, 5, 2)
    batched = propagate(cams, affinity, mask, cls_labels, 0.45)
    single = torch.cat([propagate(cams[[b]], affinity[[b]], mask, cls_labels[[b]], 0.45)
                        for b in range(4)])
    assert torch.allclose(batched, single, rtol=1e-6, atol=1e-8)


def test_inputs_untouched_and_affinity_detached():
    cams, affinity, cls_labels = random_inputs(seed=13)
    affinity.requires_grad_(True)
    mask = naive_window_mask(4, 5, 1)
    copies = [t.detach().clone() for t in (cams, affinity, mask, cls_labels)]
    out = propagate(cams, affinity, mask, cls_labels, 0.35)
    for before, after in zip(copies, (cams, affinity, mask, cls_labels)):
        assert torch.equal(before, after)
    assert not out.requires_grad


@pytest.mark.parametrize("case", ["cams", "affinity", "mask_shape", "mask_dtype", "cls_labels"])
def test_propagate_rejects_wrong_shapes(case):
    cams, affinity, cls_labels = random_inputs(seed=14)
    mask = naive_window_mask(4, 5, 1)
    if case == "cams":
        cams = cams[0]
    elif case == "affinity":
        affinity = affinity[:, :-1, :-1]
    elif case == "mask_shape":
        mask = naive_window_mask(5, 5, 1)
    elif case == "mask_dtype":
        mask = mask.float()
    elif case == "cls_labels":
        cls_labels = cls_labels[:, :-1]
    with pytest.raises(ValueError, match=case.split("_")[0]):
        propagate(cams, affinity, mask, cls_labels, 0.35)
