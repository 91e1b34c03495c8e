"""Tests for par.py: pixel-adaptive refinement (paper §3.3)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from par import PAR
from reference import par_reference

GOLDEN = Path(__file__).parent / "golden"


def max_relative_error(actual, expected):
    return ((actual - expected).abs() / expected.abs()).max().item()


def test_matches_release_golden():
    golden = np.load(GOLDEN / "par.npz")
    images, masks = torch.from_numpy(golden["images"]), torch.from_numpy(golden["masks"])
    expected = torch.from_numpy(golden["out"])
    out = PAR()(images, masks)
    assert out.shape == expected.shape == (2, 3, 36, 44)
    assert max_relative_error(out, expected) <= 1e-5


@pytest.mark.parametrize(
    "shape, mask_size, dilations, num_iter, w1, w2",
    [
        ((2, 3, 30, 38), (15, 19), (1, 2, 4, 8, 12, 24), 10, 0.3, 0.01),
        # dilations larger than the image: replicate padding must still clamp to the border
        ((1, 3, 7, 9), (7, 9), (1, 5, 24), 4, 0.5, 0.1),
        ((3, 3, 16, 12), (4, 5), (2, 3), 3, 0.2, 0.0),
    ],
)
def test_fast_equals_naive_reference(shape, mask_size, dilations, num_iter, w1, w2):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(shape, generator=generator, dtype=torch.float64)
    masks = torch.rand(shape[0], 4, *mask_size, generator=generator, dtype=torch.float64).softmax(dim=1)
    par = PAR(dilations=dilations, num_iter=num_iter, w1=w1, w2=w2).double()
    out = par(images, masks)
    expected = par_reference(images, masks, dilations, num_iter, w1, w2)
    assert out.shape == (shape[0], 4, shape[2], shape[3])
    assert max_relative_error(out, expected) <= 1e-6


def test_kernel_rows_sum_to_one_plus_w2():
    images = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    for w2 in (0.01, 0.2):
        par = PAR(w2=w2)
        kernel = par.kernel(images)
        assert kernel.shape == (2, 48, 20, 24)
        assert (kernel > 0).all()
        torch.testing.assert_close(kernel.sum(dim=1), torch.full((2, 20, 24), 1 + w2), rtol=1e-6, atol=0)


def test_position_term_is_image_independent_buffer():
    par = PAR()
    assert "position_affinity" in dict(par.named_buffers())
    assert "position_affinity" not in par.state_dict()
    # axial neighbours are closer than diagonal ones, and nearer dilations closer still
    position = par.position_affinity.view(6, 8)  # (dilations, directions)
    axial, diagonal = [1, 3, 4, 6], [0, 2, 5, 7]
    assert (position[:, axial].min(dim=1).values > position[:, diagonal].max(dim=1).values).all()
    assert (position[:-1, 0] > position[1:, 0]).all()
    torch.testing.assert_close(position.sum(), torch.tensor(0.01))


def test_constant_mask_grows_by_one_plus_w2_per_iteration():
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 18, 22, generator=generator, dtype=torch.float64)
    value = 0.7
    masks = torch.full((2, 2, 9, 11), value, dtype=torch.float64)
    for num_iter, w2 in ((10, 0.01), (3, 0.25)):
        out = PAR(num_iter=num_iter, w2=w2).double()(images, masks)
        # the position term is stored in float32, hence 1e-8 rather than float64 precision
        torch.testing.assert_close(out, torch.full_like(out, value * (1 + w2) ** num_iter), rtol=1e-8, atol=0)


def test_invariant_to_per_channel_affine_change_of_image():
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 20, 24, generator=generator, dtype=torch.float64)
    masks = torch.rand(2, 3, 10, 12, generator=generator, dtype=torch.float64)
    gain = torch.tensor([0.5, 3.0, -2.0], dtype=torch.float64).view(1, 3, 1, 1)
    offset = torch.tensor([10.0, -3.0, 0.2], dtype=torch.float64).view(1, 3, 1, 1)
    par = PAR().double()
    out = par(images, masks)
    # exact up to the 1e-8 added to σ
    assert max_relative_error(par(images * gain + offset, masks), out) <= 1e-6
    # ... but a change that mixes channels is not an invariance
    assert max_relative_error(par(images.flip(1) * images, masks), out) > 1e-3


def test_zero_iterations_is_align_corners_upsampling():
    images = torch.rand(1, 3, 9, 13)
    masks = torch.rand(1, 2, 5, 7)
    out = PAR(num_iter=0)(images, masks)
    # align_corners=True keeps the corner values and puts the old grid on even output pixels
    torch.testing.assert_close(out[..., ::2, ::2], masks)


def test_snaps_misaligned_mask_to_image_edge():
    # image: left half dark, right half bright; mask: "left" class extends 3 pixels too far right
    H, W, edge, error = 24, 32, 16, 3
    images = torch.zeros(1, 3, H, W)
    images[..., edge:] = 1.0
    images += 0.01 * torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(4))
    left = torch.zeros(1, 1, H, W)
    left[..., : edge + error] = 1.0
    masks = torch.cat([left, 1 - left], dim=1)  # (1, 2, H, W)
    out = PAR()(images, masks)
    label = out.argmax(dim=1)[0]  # (H, W)
    expected = torch.ones(H, W, dtype=torch.long)
    expected[:, :edge] = 0
    assert (masks.argmax(dim=1)[0] != expected).sum() == H * error
    assert torch.equal(label, expected)


def test_bad_arguments_raise_value_errors():
    par = PAR()
    images, masks = torch.rand(2, 3, 8, 8), torch.rand(2, 2, 4, 4)
    with pytest.raises(ValueError, match="masks"):
        par(images, masks[:1])
    with pytest.raises(ValueError, match="images"):
        par(images[0], masks)
    with pytest.raises(ValueError, match="kernel"):
        par.refine(torch.rand(2, 5, 8, 8), masks)
    with pytest.raises(ValueError, match="dilations"):
        PAR(dilations=())
    with pytest.raises(ValueError, match="dilations"):
        PAR(dilations=(1, 0))
    with pytest.raises(ValueError, match="num_iter"):
        PAR(num_iter=-1)
    with pytest.raises(ValueError, match="w1"):
        PAR(w1=0.0)
