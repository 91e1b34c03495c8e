"""Affinity from Attention (AFA): a learned pixel affinity read off the transformer's attention.

The encoder's multi-head self-attention already says which tokens belong together, but it is
asymmetric and noisy. AFA (paper §3.2, "Affinity from Attention") turns
the pre-softmax attention logits of the last blocks into a symmetric affinity a_ij in (0, 1)
between the N = h·w tokens of the stride-16 grid, supervised by affinity labels derived from the
PAR-refined pseudo label: a pair within a local window is positive when both pixels carry the
same class, negative otherwise. The learned affinity then drives the random walk that propagates
the CAMs (random_walk.py). This module holds the four pieces: the local window, the head, the
affinity labels and the affinity loss; and the raw attention read as an affinity, which the
paper's ablation walks with instead of the learned one (§4.3, Table 4, "AFA (prop. with MHSA)").

The authors' release differs from the paper: the paper's affinity loss averages the positive and
the negative terms over their pair counts; the release halves both terms and adds 1 to each count
(so a batch without positive or without negative pairs still gives a finite loss). The paper calls
the projection of the attention maps an MLP; the release uses one 1×1 convolution with bias.
This module follows the release.
"""

import functools
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.lru_cache(maxsize=16)
def _window_mask_cached(h, w, radius, device):
    # token n sits at row n // w, column n % w of the h × w grid (row-major flattening)
    index = torch.arange(h * w, device=device)  # (N,)
    rows, cols = index // w, index % w  # (N,), (N,)
    row_distance = (rows[:, None] - rows[None, :]).abs()  # (N, N)
    col_distance = (cols[:, None] - cols[None, :]).abs()  # (N, N)
    # Chebyshev distance: the pair lies in the (2·radius + 1)² square centred on either pixel
    return torch.maximum(row_distance, col_distance) <= radius  # (N, N)


def window_mask(h, w, radius=8, device=None):
    """Pairs of grid cells within a square window of the given radius.

    Entry (i, j) is True when tokens i and j of the row-major flattened h × w grid are at
    Chebyshev distance ≤ radius, i.e. j lies in the (2·radius + 1)² square centred on i. The mask
    is symmetric with a True diagonal. It is built once per (h, w, radius, device) and cached,
    since training asks for it at every step; each call returns a fresh copy, so modifying the
    result in place cannot affect later calls.

    Returns a (N, N) bool tensor, N = h·w, on `device` (CPU when None).
    """
    if not all(isinstance(size, numbers.Integral) and size > 0 for size in (h, w)):
        raise ValueError(f"h and w must be positive ints, got h={h!r}, w={w!r}")
    if not (isinstance(radius, numbers.Integral) and radius >= 0):
        raise ValueError(f"radius must be a non-negative int, got {radius!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    return _window_mask_cached(int(h), int(w), int(radius), device).clone()


class AffinityHead(nn.Module):
    """Maps stacked attention logits to a symmetric affinity in (0, 1) (paper §3.2).

    S = A + Aᵀ per attention map makes the input symmetric, a 1×1 convolution with bias mixes the
    num_maps maps into one, and a sigmoid gives the affinity. Because every input channel is
    symmetric and the convolution acts on each pair (i, j) alone, a_ij = a_ji by construction
    (the logits exactly; the sigmoid's vectorised kernel may differ from its scalar tail in the
    last bit). In AFANet num_maps is twice the heads of the last stage: the last two blocks, all
    their heads.
    """

    def __init__(self, num_maps):
        super().__init__()
        self.num_maps = num_maps
        self.proj = nn.Conv2d(num_maps, 1, kernel_size=1, bias=True)
        # the release's initialisation of this projection (the bias keeps PyTorch's default)
        nn.init.kaiming_normal_(self.proj.weight, a=math.sqrt(5), mode="fan_out")

    def forward(self, attn_logits):
        """attn_logits (B, num_maps, N, N), pre-softmax -> affinity (B, N, N) in (0, 1)."""
        if not torch.is_tensor(attn_logits) or attn_logits.dim() != 4 or \
                attn_logits.shape[1] != self.num_maps or attn_logits.shape[2] != attn_logits.shape[3]:
            shape = tuple(attn_logits.shape) if torch.is_tensor(attn_logits) else type(attn_logits).__name__
            raise ValueError(f"attn_logits must have shape (B, {self.num_maps}, N, N), got {shape}")
        symmetric = attn_logits + attn_logits.transpose(-2, -1)  # S = A + Aᵀ  (B, num_maps, N, N)
        logits = self.proj(symmetric)  # (B, 1, N, N), Σ_m w_m S_m + b
        return torch.sigmoid(logits).squeeze(1)  # (B, N, N)


def affinity_labels(pseudo_label, grid, mask, ignore_index=255):
    """Pairwise affinity labels from a pseudo label (paper §3.2).

    The pseudo label is downsampled to the grid by nearest-neighbour interpolation (PyTorch's
    "nearest": source index floor(dst · in / out)). Pair (i, j) is labelled 1 when both pixels
    carry the same class (background with background included), 0 when they differ, and
    ignore_index when either pixel is ignored or the pair lies outside the window.

    pseudo_label: (B, H, W) integer class ids, ignore_index for unknown pixels.
    grid: (h, w), the token grid of the affinity.
    mask: (N, N) bool window (see window_mask), or None to keep every pair.
    Returns (B, N, N) int64 in {0, 1, ignore_index}, symmetric.
    """
    if pseudo_label.dim() != 3:
        raise ValueError(f"pseudo_label must have shape (B, H, W), got {tuple(pseudo_label.shape)}")
    if len(grid) != 2:
        raise ValueError(f"grid must be (h, w), got {grid!r}")
    h, w = int(grid[0]), int(grid[1])
    B, N = pseudo_label.shape[0], h * w
    if mask is not None and (mask.shape != (N, N) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape ({N}, {N}) for grid {(h, w)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")

    # nearest works on floats; class ids are small integers, so float32 holds them exactly
    label = pseudo_label[:, None].float()  # (B, 1, H, W)
    label = F.interpolate(label, size=(h, w), mode="nearest")  # (B, 1, h, w)
    label = label.view(B, N)  # (B, N)
    same = label[:, :, None] == label[:, None, :]  # (B, N, N)
    ignored = label == ignore_index  # (B, N)
    ignored_pair = ignored[:, :, None] | ignored[:, None, :]  # (B, N, N)
    if mask is not None:
        ignored_pair = ignored_pair | ~mask.to(label.device)  # (B, N, N)
    labels = same.long()  # (B, N, N)
    return labels.masked_fill(ignored_pair, ignore_index)  # (B, N, N)


def affinity_loss(affinity, labels):
    """Affinity loss (paper §3.2, as in the release):

    L_aff = ½ · Σ_pos (1 − a_ij) / (n_pos + 1) + ½ · Σ_neg a_ij / (n_neg + 1),

    over the positive (label 1) and negative (label 0) pairs of the whole batch; other labels are
    ignored. The +1 keeps the loss finite (0) when a batch has no pair of one kind.

    affinity: (B, N, N) in (0, 1). labels: (B, N, N) from affinity_labels. Returns a scalar.
    """
    if affinity.shape != labels.shape or affinity.dim() != 3:
        raise ValueError(f"affinity and labels must both have shape (B, N, N), "
                         f"got {tuple(affinity.shape)} and {tuple(labels.shape)}")
    positive = labels == 1  # (B, N, N)
    negative = labels == 0  # (B, N, N)
    zero = affinity.new_zeros(())
    positive_loss = torch.where(positive, 1 - affinity, zero).sum() / (positive.sum() + 1)
    negative_loss = torch.where(negative, affinity, zero).sum() / (negative.sum() + 1)
    return 0.5 * positive_loss + 0.5 * negative_loss


def mhsa_affinity(attn_logits, head_dim):
    """The MHSA maps as an affinity (B, N, N): the paper's "propagation with MHSA" (Table 4).

    attn_logits: the pre-softmax, unscaled logits q·kᵀ of the blocks that feed the AFA head, each
    (B, nh, N, N) (or one such tensor); head_dim d = the per-head width of those blocks (the last
    stage's embed dim / its heads). The definition, in float32 also inside an autocast region:

        A_l,m = softmax_j(q·kᵀ / √d)        each block l and head m, rows sum to 1,
        Ā = mean over l and m of A_l,m,     (B, N, N)
        affinity = (Ā + Āᵀ) / 2              symmetric, non-negative, in [0, 1].

    The random walk then uses it as it uses the learned affinity (squared, windowed, columns
    normalised): only the source of the pairwise scores changes. Whether the walk helps depends
    on the rows' structure, not their scale: pixel j's label follows its object only where the
    attention of j's object goes to j's object (a constant factor, or the release's +0.1 column
    offset, leaves each arg-max in place). What attention trained from scratch does here:
    docs/demo_study.md ("Propagation with the raw attention").
    """
    if torch.is_tensor(attn_logits):
        attn_logits = [attn_logits]
    inv_sqrt_d = head_dim ** -0.5
    total, maps = 0, 0
    with torch.autocast(attn_logits[0].device.type, enabled=False):
        for logits in attn_logits:  # (B, nh, N, N)
            attention = (logits.float() * inv_sqrt_d).softmax(dim=-1)  # (B, nh, N, N)
            total = total + attention.sum(dim=1)  # (B, N, N)
            maps += logits.shape[1]
        mean = total / maps  # (B, N, N)
        return (mean + mean.transpose(1, 2)) / 2  # (B, N, N)
