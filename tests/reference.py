"""Naive reference implementations, written for obviousness rather than speed.

Tests compare the fast modules against these; benchmarks may time them.
"""
import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# PAR (paper §3.3), a direct translation: neighbours by clamped coordinates, one at a time.
# ---------------------------------------------------------------------------------------------

def par_neighbour_offsets(dilations):
    """The 8 · len(dilations) (row, column) offsets, row-major over the 3 × 3 window per dilation."""
    directions = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return [(dy * d, dx * d) for d in dilations for dy, dx in directions]


def par_gather_neighbours(x, offsets):
    """x (B, c, H, W) -> (B, c, P, H, W): neighbour (y + dy, x + dx), coordinates clamped (replicate)."""
    H, W = x.shape[-2:]
    rows = torch.arange(H)
    cols = torch.arange(W)
    out = []
    for dy, dx in offsets:
        r = (rows + dy).clamp(0, H - 1)
        c = (cols + dx).clamp(0, W - 1)
        out.append(x[:, :, r][:, :, :, c])
    return torch.stack(out, dim=2)


def par_reference(images, masks, dilations=(1, 2, 4, 8, 12, 24), num_iter=10, w1=0.3, w2=0.01):
    """PAR()(images (B, 3, H, W), masks (B, K, h, w)) -> (B, K, H, W), straight from the formulas of paper §3.3."""
    B, _, H, W = images.shape
    offsets = par_neighbour_offsets(dilations)
    P = len(offsets)

    # appearance: κ = −(|I_i − I_j| / (σ_i + 1e-8) / w1)², mean over colour channels
    neighbours = par_gather_neighbours(images, offsets)  # (B, 3, P, H, W)
    centre = images.unsqueeze(2).repeat(1, 1, P, 1, 1)  # (B, 3, P, H, W)
    sigma = torch.std(neighbours, dim=2, keepdim=True, unbiased=True)  # (B, 3, 1, H, W)
    kappa = -((neighbours - centre).abs() / (sigma + 1e-8) / w1) ** 2
    kappa = kappa.mean(dim=1)  # (B, P, H, W)

    # position: κp = −(p / (σ_p + 1e-8) / w1)², p = d or √2·d
    distance = torch.tensor([math.sqrt(dy * dy + dx * dx) for dy, dx in offsets], dtype=images.dtype)
    distance = distance.view(1, P, 1, 1).repeat(B, 1, H, W)  # (B, P, H, W)
    sigma_p = torch.std(distance, dim=1, keepdim=True, unbiased=True)
    kappa_p = -(distance / (sigma_p + 1e-8) / w1) ** 2

    affinity = F.softmax(kappa, dim=1) + w2 * F.softmax(kappa_p, dim=1)  # (B, P, H, W)

    masks = F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=True)  # (B, K, H, W)
    for _ in range(num_iter):
        masks = (par_gather_neighbours(masks, offsets) * affinity.unsqueeze(1)).sum(dim=2)
    return masks


# ---------------------------------------------------------------------------------------------
# The local window of AFA (paper §3.2): a double loop over cells and their squares.
# ---------------------------------------------------------------------------------------------

def naive_window_mask(h, w, radius):
    """For every cell, mark every cell of the clipped (2·radius + 1)² square around it."""
    mask = torch.zeros(h * w, h * w, dtype=torch.bool)
    for i in range(h * w):
        row, col = divmod(i, w)
        for r in range(max(0, row - radius), min(h, row + radius + 1)):
            for c in range(max(0, col - radius), min(w, col + radius + 1)):
                mask[i, r * w + c] = True
    return mask
