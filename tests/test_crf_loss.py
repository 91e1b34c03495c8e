"""Tests for crf_loss.py: L_reg, the dense-CRF energy loss (paper §3.4; Tang et al., ECCV 2018)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from crf_loss import DenseCRFLoss, bilateral_filter, lattice_features

GOLDEN = Path(__file__).parent / "golden"


def known_answer_inputs():
    """The 20 × 24 image and values whose filtered sums and pixels the release's C++ gave."""
    y, x = torch.meshgrid(torch.arange(20, dtype=torch.float64), torch.arange(24, dtype=torch.float64),
                          indexing="ij")
    red = torch.round(127.5 + 100 * torch.sin(0.3 * x + 0.2 * y))
    green = torch.round(127.5 + 100 * torch.cos(0.25 * y))
    blue = (7 * x + 11 * y) % 256
    images = torch.stack([red, green, blue])[None].float()  # (1, 3, 20, 24)
    values = torch.stack([torch.ones_like(x), x / 24])[None].float()  # (1, 2, 20, 24)
    return images, values


def natural_images(B, H, W, seed):
    """Piecewise-smooth RGB images in 0–255: colour ramps, a sharp-edged disc, a little noise."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, H, dtype=torch.float64), torch.linspace(0, 1, W, dtype=torch.float64),
                          indexing="ij")
    images = []
    for _ in range(B):
        base = torch.rand(3, 1, 1, generator=generator, dtype=torch.float64) * 160
        ramp = torch.rand(3, 2, generator=generator, dtype=torch.float64) * 80
        image = base + ramp[:, :1, None] * x + ramp[:, 1:, None] * y  # (3, H, W)
        centre = torch.rand(2, generator=generator, dtype=torch.float64) * 0.6 + 0.2
        disc = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 < 0.06).to(torch.float64)
        image = image + disc * (torch.rand(3, 1, 1, generator=generator, dtype=torch.float64) * 120 - 60)
        image = image + 4 * torch.randn(3, H, W, generator=generator, dtype=torch.float64)
        images.append(image.clamp(0, 255).round())
    return torch.stack(images).float()  # (B, 3, H, W)


def lattice_matrix(image, sigma_rgb, sigma_xy):
    """The filter as a dense (N, N) float64 matrix, W[i, j] = (W e_j)_i, by filtering the identity."""
    _, h, w = image.shape
    N = h * w
    identity = torch.eye(N, dtype=torch.float64).view(1, N, h, w)  # channel j = e_j
    return bilateral_filter(image[None], identity, sigma_rgb, sigma_xy)[0].reshape(N, N).T  # (N, N)


def gaussian_matrix(image, sigma_rgb, sigma_xy):
    """The exact bilateral Gaussian exp(−|f_i − f_j|² / 2), (N, N) float64."""
    _, h, w = image.shape
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    features = torch.cat([torch.stack([x, y]) / sigma_xy, image.double() / sigma_rgb]).reshape(5, h * w).T  # (N, 5)
    return torch.exp(-torch.cdist(features, features) ** 2 / 2)


# ---------------------------------------------------------------- the filter


def test_known_answers_of_the_release_filter():
    images, values = known_answer_inputs()
    out = bilateral_filter(images, values, sigma_rgb=15, sigma_xy=5)
    assert out.shape == (1, 2, 20, 24) and out.dtype == torch.float32
    expected = {
        "sum 0": (out[0, 0].sum(), 1008.8138), "sum 1": (out[0, 1].sum(), 471.9822),
        "(0, 0)": (out[0, 0, 0, 0], 0.857138), "(10, 5)": (out[0, 0, 10, 5], 0.934770),
        "(19, 23)": (out[0, 0, 19, 23], 0.793491), "channel 1 (7, 17)": (out[0, 1, 7, 17], 0.405271),
    }
    for name, (actual, answer) in expected.items():
        assert abs(actual.item() / answer - 1) <= 1e-5, (name, actual.item(), answer)


def test_features_use_true_division():
    # x · (1/σ) instead of x / σ moves pixels to other lattice cells (the known answers then fail).
    images, _ = known_answer_inputs()
    features = lattice_features(images, sigma_rgb=15, sigma_xy=5)[0].numpy()  # (N, 5)
    x = np.tile(np.arange(24, dtype=np.float32), 20)
    colour = images[0].numpy().reshape(3, -1).T  # (N, 3)
    np.testing.assert_array_equal(features[:, 0], x / np.float32(5))
    np.testing.assert_array_equal(features[:, 2:], colour / np.float32(15))


def test_matches_release_golden_filter():
    golden = np.load(GOLDEN / "crf_filter.npz")
    images = torch.from_numpy(golden["images"]).float()
    out = bilateral_filter(images, torch.from_numpy(golden["values"]),
                           float(golden["sigma_rgb"]), float(golden["sigma_xy"]))
    expected = torch.from_numpy(golden["out"])
    assert out.shape == expected.shape
    assert ((out - expected).abs() / expected.abs()).max().item() <= 1e-4


@pytest.mark.parametrize("sigma_rgb, sigma_xy", [(15, 10), (15, 5), (30, 8)])
def test_close_to_scaled_exact_gaussian(sigma_rgb, sigma_xy):
    # The lattice approximates 0.5–0.7 × the exact Gaussian (≈ 0.58 in the interior) to ≈ 10%.
    images = torch.from_numpy(np.load(GOLDEN / "crf_filter.npz")["images"]).float()  # natural photo crops
    images = torch.cat([images, natural_images(1, 36, 44, seed=3)])  # and a synthetic one
    values = torch.rand(3, 3, 36, 44, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    lattice = bilateral_filter(images, values, sigma_rgb, sigma_xy).flatten(2)  # (3, 3, N)
    for b, image in enumerate(images):
        gaussian = values[b].flatten(1) @ gaussian_matrix(image, sigma_rgb, sigma_xy)  # (3, N), symmetric
        scale = (lattice[b] * gaussian).sum() / (gaussian * gaussian).sum()
        assert 0.5 <= scale <= 0.7
        assert ((lattice[b] - scale * gaussian).norm() / (scale * gaussian).norm()).item() < 0.15


def test_linear_in_values_and_float64_uses_the_same_lattice():
    images = natural_images(2, 18, 22, seed=1)
    generator = torch.Generator().manual_seed(1)
    u, v = torch.randn(2, 2, 4, 18, 22, generator=generator, dtype=torch.float64)
    out_u, out_v = bilateral_filter(images, u, 15, 6), bilateral_filter(images, v, 15, 6)
    torch.testing.assert_close(bilateral_filter(images, 2.5 * u - 0.5 * v, 15, 6), 2.5 * out_u - 0.5 * out_v,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bilateral_filter(images, u.float(), 15, 6), out_u.float(), rtol=1e-5, atol=1e-5)
    # Differentiable in the values (autograd gives Wᵀ; the loss below uses its own gradient instead).
    small = u[:1, :2, :4, :5].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: bilateral_filter(images[:1, :, :4, :5], x, 15, 6), (small,))


def test_non_negative_with_self_term_and_no_normalisation():
    image = natural_images(1, 12, 14, seed=2)[0]
    matrix = lattice_matrix(image, 15, 5)  # (N, N)
    # Entries are ≥ 0 up to float32 rounding of the barycentric weights (as in the C++).
    assert matrix.min().item() >= -1e-6 * matrix.max().item()
    assert (matrix.diagonal() > 0.4).all()  # a pixel keeps ≈ 0.53 of its own value
    ones = bilateral_filter(image[None], torch.ones(1, 1, 12, 14), 15, 5)
    assert (ones > 0).all() and not torch.allclose(ones, torch.ones_like(ones), atol=0.1)


def test_images_and_channels_are_independent():
    images = natural_images(3, 16, 20, seed=4)
    values = torch.rand(3, 5, 16, 20, generator=torch.Generator().manual_seed(4))
    out = bilateral_filter(images, values, 15, 8)
    for b in range(3):
        torch.testing.assert_close(out[b:b + 1], bilateral_filter(images[b:b + 1], values[b:b + 1], 15, 8),
                                   rtol=1e-6, atol=1e-6)
    # A subset of the channels, in another order, gives the same channels.
    torch.testing.assert_close(bilateral_filter(images, values[:, [3, 0]], 15, 8), out[:, [3, 0]],
                               rtol=1e-6, atol=1e-6)
    changed = images.clone()
    changed[1] = 255 - changed[1]
    out_changed = bilateral_filter(changed, values, 15, 8)
    torch.testing.assert_close(out_changed[[0, 2]], out[[0, 2]], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out_changed[1], out[1], atol=1e-3)


def test_filter_rejects_bad_shapes():
    with pytest.raises(ValueError, match="crf_loss.py.*images"):
        bilateral_filter(torch.rand(1, 1, 8, 8), torch.rand(1, 2, 8, 8), 15, 5)
    with pytest.raises(ValueError, match="crf_loss.py.*values"):
        bilateral_filter(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 9), 15, 5)


# ---------------------------------------------------------------- the loss


def test_matches_release_golden_loss_and_gradient():
    golden = np.load(GOLDEN / "crf_loss.npz")
    probs = torch.from_numpy(golden["probs"]).requires_grad_()
    loss = DenseCRFLoss()(torch.from_numpy(golden["images"]).float(), probs,
                          torch.from_numpy(golden["roi"]).float(), torch.from_numpy(golden["label"]).long())
    loss.backward()
    assert loss.dim() == 0
    assert abs(loss.item() / float(golden["loss"]) - 1) <= 1e-4
    expected = torch.from_numpy(golden["grad_probs"])  # (B, 2, H, W): the first two classes
    actual = probs.grad[:, :expected.shape[1]]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def naive_loss_and_gradient(images, probs, roi, label, weight, sigma_rgb, sigma_xy):
    """The release's L_reg and its gradient with respect to the full-resolution probs, written out:
    half resolution by hand, the filter as a dense matrix, a loop over images and classes."""
    B, C, H, W = probs.shape
    small_images = images[:, :, ::2, ::2]  # nearest: the top-left pixel of each 2 × 2
    small_probs = probs.reshape(B, C, H // 2, 2, W // 2, 2).mean(dim=(3, 5))  # bilinear ×0.5: the 2 × 2 mean
    small_roi, unlabelled = roi[:, ::2, ::2], label[:, ::2, ::2] == 255
    energy, small_grad = 0.0, torch.zeros_like(small_probs)
    for b in range(B):
        matrix = lattice_matrix(small_images[b], sigma_rgb, sigma_xy * 0.5)  # (n, n), σ_xy scaled
        S = small_probs[b].reshape(C, -1)  # (C, n)
        R = small_roi[b].reshape(-1)  # (n,)
        G = torch.where(unlabelled[b].reshape(-1), torch.ones_like(R), (R - S.max(dim=0).values).clamp(min=0))
        for k in range(C):
            masked = R * S[k]  # S̃_k
            filtered = matrix @ masked  # W S̃_k
            energy = energy - (masked * G * filtered).sum() / B
            small_grad[b, k] = (-2 / B * R * G * filtered).reshape(H // 2, W // 2)
    # The adjoint of the 2 × 2 mean: every pixel gets a quarter of its block's gradient.
    grad = small_grad.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) / 4
    return weight * energy, weight * grad


def loss_inputs(B=2, C=3, H=12, W=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = natural_images(B, H, W, seed=seed)
    logits = torch.randn(B, C, H, W, generator=generator, dtype=torch.float64) * 2
    roi = torch.zeros(B, H, W, dtype=torch.float64)
    roi[0] = 1
    roi[1, 2:10, 4:14] = 1  # a padded crop; the box is aligned to the 2 × 2 blocks
    label = torch.randint(0, C, (B, H, W), generator=generator)
    label[torch.rand(B, H, W, generator=generator) < 0.3] = 255
    return images, logits, roi, label


@pytest.mark.parametrize("sigma_rgb, sigma_xy", [(15, 100), (20, 8)])
def test_loss_and_gradient_match_the_naive_formulas(sigma_rgb, sigma_xy):
    images, logits, roi, label = loss_inputs()
    probs = logits.softmax(dim=1).requires_grad_()
    loss_layer = DenseCRFLoss(weight=1e-3, sigma_rgb=sigma_rgb, sigma_xy=sigma_xy)
    loss = loss_layer(images, probs, roi, label)
    loss.backward()
    expected_loss, expected_grad = naive_loss_and_gradient(images, probs.detach(), roi, label,
                                                           1e-3, sigma_rgb, sigma_xy)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(probs.grad, expected_grad, rtol=1e-10, atol=1e-16)


def test_gradient_flows_through_the_softmax():
    images, logits, roi, label = loss_inputs(seed=1)
    logits.requires_grad_()
    DenseCRFLoss(weight=1.0, sigma_xy=10)(images, logits.softmax(dim=1), roi, label).backward()
    probs = logits.detach().softmax(dim=1)
    _, grad_probs = naive_loss_and_gradient(images, probs, roi, label, 1.0, 15, 10)
    # d/dz softmax: p ⊙ (g − Σ_k p_k g_k)
    expected = probs * (grad_probs - (probs * grad_probs).sum(dim=1, keepdim=True))
    torch.testing.assert_close(logits.grad, expected, rtol=1e-10, atol=1e-16)


def test_nothing_outside_the_roi_matters():
    images, logits, roi, label = loss_inputs(seed=2)
    probs = logits.softmax(dim=1).requires_grad_()
    loss = DenseCRFLoss(weight=1.0, sigma_xy=10)(images, probs, roi, label)
    loss.backward()
    outside = roi == 0  # (B, H, W)
    assert outside.any() and (probs.grad.abs().sum(dim=1)[~outside] > 0).any()
    assert (probs.grad.permute(0, 2, 3, 1)[outside] == 0).all()
    other = logits.clone()
    other[outside[:, None].expand_as(other)] = 5.0
    torch.testing.assert_close(DenseCRFLoss(weight=1.0, sigma_xy=10)(images, other.softmax(dim=1), roi, label),
                               loss.detach(), rtol=1e-12, atol=0)


def test_empty_roi_gives_zero_and_all_ignored_stays_finite():
    images, logits, roi, label = loss_inputs(seed=3)
    loss_layer = DenseCRFLoss(weight=1.0, sigma_xy=10)
    probs = logits.softmax(dim=1).requires_grad_()
    loss = loss_layer(images, probs, torch.zeros_like(roi), label)
    loss.backward()
    assert loss.item() == 0 and (probs.grad == 0).all()

    # Every pixel ignored: G = 1 everywhere, the plain CRF energy of the masked probabilities.
    probs.grad = None
    ignored = torch.full_like(label, 255)
    loss = loss_layer(images, probs, roi, ignored)
    loss.backward()
    expected_loss, expected_grad = naive_loss_and_gradient(images, probs.detach(), roi, ignored, 1.0, 15, 10)
    assert torch.isfinite(loss) and loss.item() < 0 and torch.isfinite(probs.grad).all()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(probs.grad, expected_grad, rtol=1e-10, atol=1e-16)

    probs.grad = None
    loss = loss_layer(images, probs, torch.zeros_like(roi), ignored)
    loss.backward()
    assert loss.item() == 0 and (probs.grad == 0).all()


def test_loss_rejects_mismatched_shapes():
    images, logits, roi, label = loss_inputs()
    with pytest.raises(ValueError, match="crf_loss.py.*roi"):
        DenseCRFLoss()(images, logits.softmax(dim=1), roi[:, :-2], label)
    normalised = (images - 120) / 58  # the network input instead of the RGB image
    with pytest.raises(ValueError, match="crf_loss.py.*denormalised"):
        DenseCRFLoss()(normalised, logits.softmax(dim=1), roi, label)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    images, values = known_answer_inputs()
    out = bilateral_filter(images.cuda(), values.cuda(), sigma_rgb=15, sigma_xy=5).cpu()
    torch.testing.assert_close(out, bilateral_filter(images, values, sigma_rgb=15, sigma_xy=5), rtol=1e-5, atol=1e-6)
    golden = np.load(GOLDEN / "crf_loss.npz")
    probs = torch.from_numpy(golden["probs"]).cuda().requires_grad_()
    loss = DenseCRFLoss()(torch.from_numpy(golden["images"]).float().cuda(), probs,
                          torch.from_numpy(golden["roi"]).float().cuda(),
                          torch.from_numpy(golden["label"]).long().cuda())
    loss.backward()
    assert abs(loss.item() / float(golden["loss"]) - 1) <= 1e-4
    expected = torch.from_numpy(golden["grad_probs"])
    torch.testing.assert_close(probs.grad[:, :expected.shape[1]].cpu(), expected, rtol=1e-4,
                               atol=1e-4 * expected.abs().max().item())
