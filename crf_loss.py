"""L_reg: the dense-CRF energy loss on the segmentation branch, in plain PyTorch.

The seg branch learns from pseudo labels that are coarse at object boundaries. L_reg (paper §3.4;
the regularised loss of Tang et al., ECCV 2018, "On Regularized Losses for Weakly-supervised CNN
Segmentation") asks the seg branch's soft prediction to have a low dense-CRF energy: pixels close
in position and colour should get the same class. It runs beside L_seg on the upsampled seg logits.
With S (B, C, h, w) the softmax at half the crop's resolution (h × w = H/2 × W/2), ROI (B, h, w)
the valid (unpadded) box, and W the bilateral affinity between the pixels of one image,

    S̃ = ROI · S,                                                          (B, C, h, w)
    G = max(ROI − max_k S_k, 0), and G = 1 where the seg target is 255;   (B, h, w), no gradient
    E = −(1/B) · Σ_{b,k,i} S̃_bki · G_bi · (W S̃)_bki,        L_reg = weight · E.

The gate G takes confident pixels (max_k S_k ≈ 1) out of the energy and keeps the uncertain and
unlabelled ones. The gradient is the release's, not autograd's derivative of E:

    dE/dS = −(2/B) · ROI · G · (W S̃),                                     (B, C, h, w)

twice the gated filter response (the derivative of −S̃ᵀ W S̃ for a symmetric W, gated afterwards);
autograd carries it from the half-resolution S back through the downscale and the softmax.

W is the permutohedral-lattice filter (Adams et al., Eurographics 2010) of Krähenbühl's dense-CRF
C++, which the release called, reproduced here operation for operation. Each pixel is a point
f = (x/σ_xy, y/σ_xy, r/σ_rgb, g/σ_rgb, b/σ_rgb) in d = 5 dimensions. The lattice tiles the plane
{Σ z = 0} of R^(d+1) with simplices whose vertices are the integer points with all coordinates
congruent mod d+1. A pixel is *elevated* onto that plane (z = E·f, scaled so that the blur below
is a Gaussian of standard deviation ≈ 1 in f); its enclosing simplex is found by rounding z to the
nearest vertex whose coordinates are multiples of d+1 and sorting the remainders (their ranks name
the d+1 corners); its value is *splatted* onto those corners with its barycentric weights. The
lattice values are *blurred* with (½, 1, ½) — v ← v + ½(v_prev + v_next) — along each of the d+1
lattice directions in turn, and *sliced*: each pixel reads back the barycentric-weighted sum of its
corners, times α = 1/(1 + 2⁻ᵈ). Only vertices that some pixel touches exist (a missing neighbour
counts as 0). Nothing is normalised and a pixel's own value is included, so W ≈ 0.58 × exp(−|f_i −
f_j|²/2) with ≈ 10% deviation, not exactly symmetric. The C++'s hash table becomes a sorted array of
integer vertex codes (torch.unique), splat an index_add, the blur's neighbours a searchsorted and
gathers, slice a gather — all batched over images (the image index is part of every code) and
channels: (B, K, h, w) → points (P, d), P = B·h·w → corners (P, d+1) of M vertices → lattice
values (M, K) → (P, K) → (B, K, h, w).

The authors' release differs from the paper: the paper names Tang et al.'s dense-CRF energy; the
layer the release trained with (weight 1e-7, entering the total loss with factor 0.01 after
`cam_iters`) adds the gate G and the unlabelled pixels (neither is in rloss's DenseCRFLoss)
and back-propagates the gradient above rather than E's derivative. The final release dropped L_reg
because its C++ filter would not build for users. Parity with that filter needs its float32
arithmetic for the vertex keys — true division for the features, the elevation summed in float32
from the last coordinate down — as other float orders move ~0.5% of the pixels to another cell.
"""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# d: the lattice dimension, one per feature (x, y, r, g, b).
FEATURE_DIM = 5
# Vertex codes are int64; beyond this the mixed-radix code of a vertex could overflow.
MAX_VERTEX_CODE = 2 ** 62


def true_divide(x, divisor):
    """x / divisor elementwise in x's dtype, as a true division on every device.

    A GPU divides a tensor by a Python number through its reciprocal, x · (1/s), which differs from
    x / s in the last bit and moves pixels to another lattice cell; a full tensor divisor is exact.
    """
    return x / torch.full_like(x, divisor)


def elevation_scale(d):
    """The diagonal of the elevation matrix E (Adams et al. 2010, p. 5), float32, as the C++ has it.

    scale_i = √(2/3)·(d+1) / √((i+1)(i+2)): the lattice spacing that makes the blur a Gaussian of
    standard deviation 1 in feature units. The C++ (its SSE build) rounds √(2/3)·(d+1) to float32,
    multiplies it by 1/√((i+1)(i+2)) in float64 and rounds the product to float32.
    """
    inverse_std = torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32).item()
    return torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inverse_std for i in range(d)], dtype=torch.float32)


@functools.lru_cache(maxsize=8)  # a constant: computed once, not on every call
def slice_alpha(d):
    """The slice's normalisation α = 1/(1 + 2^-d), rounded to float32 as the C++ has it."""
    return torch.tensor(1.0 / (1.0 + 2.0 ** -d), dtype=torch.float32).item()


@functools.lru_cache(maxsize=8)  # one host→device copy per device, not one a step; never written to
def _elevation_scale_on(d, device):
    return elevation_scale(d).to(device)


def lattice_features(images, sigma_rgb, sigma_xy):
    """Pixel features f = (x/σ_xy, y/σ_xy, r/σ_rgb, g/σ_rgb, b/σ_rgb) in float32, x = column.

    images: (B, 3, h, w) RGB in 0–255. Returns (B, N, 5), N = h·w pixels in row-major order.
    """
    B, _, h, w = images.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=images.device, dtype=torch.float32),
                            torch.arange(w, device=images.device, dtype=torch.float32), indexing="ij")
    position = true_divide(torch.stack([xs, ys]), float(sigma_xy))  # (2, h, w)
    colour = true_divide(images.detach().float(), float(sigma_rgb))  # (B, 3, h, w)
    features = torch.cat([position.expand(B, 2, h, w), colour], dim=1)  # (B, 5, h, w)
    return features.permute(0, 2, 3, 1).reshape(B, h * w, FEATURE_DIM)  # (B, N, d)


@torch.no_grad()
def permutohedral_lattice(features):
    """The enclosing simplex of every point and the blur neighbours of every lattice vertex.

    features: (B, N, d) float32, the points of B images (images never share a vertex).
    Returns, with P = B·N points and M lattice vertices over the batch,
      vertex: (P, d+1) int64, the vertex (0..M-1) at each corner of the point's simplex;
      barycentric: (P, d+1) float32, the point's barycentric weight on each of those vertices;
      neighbours: (d+1, 2, M+1) int64, per lattice axis the previous and next vertex along it;
        index M stands for a missing vertex (the caller keeps a row of zeros there, whose own
        neighbours are M again).
    """
    B, N, d = features.shape
    P = B * N
    device = features.device
    image_index = torch.arange(B, device=device).repeat_interleave(N)  # (P,)
    features = features.reshape(P, d)  # (P, d)

    # Elevate onto the plane Σ z = 0 of R^(d+1): z = E·f with E's triangular form, summed in float32
    # from the last coordinate down as the C++ does.
    scaled = features * _elevation_scale_on(d, device)  # (P, d)
    elevated = torch.empty(P, d + 1, dtype=torch.float32, device=device)  # (P, d+1)
    partial_sum = torch.zeros(P, dtype=torch.float32, device=device)  # (P,)
    for j in range(d, 0, -1):
        elevated[:, j] = partial_sum - j * scaled[:, j - 1]  # z_j = Σ_{i≥j} s_i f_i − j·s_{j-1} f_{j-1}
        partial_sum = partial_sum + scaled[:, j - 1]
    elevated[:, 0] = partial_sum

    # Nearest remainder-0 point: every coordinate rounded to a multiple of d+1 (half to even, as SSE).
    down_factor = torch.full((), 1.0 / (d + 1), dtype=torch.float32, device=device)  # filled there, not copied
    rounded = torch.round(elevated * down_factor)  # (P, d+1)
    remainder0 = rounded * (d + 1)  # (P, d+1) float32
    coordinate_sum = rounded.sum(dim=1).long()  # (P,) exact: small integers in float32

    # rank_m = position of coordinate m when the differences z − remainder0 are sorted in
    # decreasing order (ties: the lower index ranks first), from pairwise comparisons.
    difference = elevated - remainder0  # (P, d+1)
    less = difference[:, :, None] < difference[:, None, :]  # (P, d+1, d+1): [p, m, j] = δ_m < δ_j
    after = torch.ones(d + 1, d + 1, dtype=torch.bool, device=device).triu(diagonal=1)  # [m, j]: j > m
    rank = (less & after).sum(dim=2) + (~less & after).sum(dim=1)  # (P, d+1) in 0..d
    # The rounded point may be off the plane (Σ ≠ 0): shift ranks and fold them back into 0..d.
    rank = rank + coordinate_sum[:, None]
    wrap = (rank < 0).long() - (rank > d).long()  # (P, d+1) in {−1, 0, 1}
    rank = rank + (d + 1) * wrap
    remainder0 = remainder0 + (d + 1) * wrap.float()

    # Barycentric weights (Adams et al. 2010, p. 10): with u_k the scaled difference of rank k,
    # weight of corner r = u_{d−r} − u_{d−r+1}, and of corner 0 = u_d + (1 − u_0).
    scaled_difference = (elevated - remainder0) * down_factor  # (P, d+1)
    by_rank = torch.zeros_like(scaled_difference).scatter_(1, rank, scaled_difference)  # (P, d+1)
    reversed_rank = by_rank.flip(1)  # (P, d+1): [r] = u_{d−r}
    barycentric = torch.cat([reversed_rank[:, :1] + (1 - reversed_rank[:, d:]),
                             reversed_rank[:, 1:] - reversed_rank[:, :-1]], dim=1)  # (P, d+1)

    # The d+1 corners: key_i = remainder0_i + canonical(r, rank_i), canonical = r or r − (d+1).
    # The last coordinate is implied (Σ key = 0) and left out, as in the C++.
    corner = torch.arange(d + 1, device=device)  # (d+1,) remainder r
    low_rank = rank[:, None, :d] <= d - corner[None, :, None]  # (P, d+1 corners, d)
    canonical = torch.where(low_rank, corner[None, :, None], corner[None, :, None] - (d + 1))
    keys = remainder0[:, None, :d].long() + canonical  # (P, d+1, d) int64

    # The hash table: a mixed-radix integer code per key (digits padded by d so that the blur
    # neighbours, at most d away per coordinate, get codes of their own), sorted and made unique.
    low = keys.amin(dim=(0, 1)) - d  # (d,)
    radix = keys.amax(dim=(0, 1)) - low + d + 1  # (d,)
    strides = [1]
    for size in radix.tolist():
        strides.append(strides[-1] * size)
    if strides[-1] * B >= MAX_VERTEX_CODE:
        raise ValueError(
            "crf_loss.py: bilateral_filter's lattice is too large to index "
            f"({strides[-1] * B:.3g} cells): sigma_xy and sigma_rgb are too small for an image "
            "of this size; use larger sigmas or filter a smaller image."
        )
    stride = torch.cat([radix.new_ones(1), radix.cumprod(0)])  # (d+1,) the strides, on the device
    codes = ((keys - low) * stride[:d]).sum(dim=2) + image_index[:, None] * stride[d]  # (P, d+1)
    vertex_codes, vertex = torch.unique(codes, sorted=True, return_inverse=True)  # (M,), (P, d+1)
    M = vertex_codes.numel()

    # Blur neighbours along lattice axis j: key − 1 with key_j + d (previous), key + 1 with key_j − d
    # (next); along axis d all d stored coordinates move by ∓1. Codes are linear in the key, so the
    # previous vertex has code + step; and b is the previous of a exactly when a is the next of b.
    neighbours = torch.full((d + 1, 2, M + 1), M, dtype=torch.long, device=device)  # (d+1, 2, M+1)
    all_vertices = torch.arange(M, device=device)  # (M,)
    for j in range(d + 1):
        step = -sum(strides[:d]) + ((d + 1) * strides[j] if j < d else 0)
        target = vertex_codes + step  # (M,) code of each vertex's previous vertex
        position = torch.searchsorted(vertex_codes, target).clamp(max=M - 1)  # (M,)
        found = vertex_codes[position] == target  # (M,)
        previous = torch.where(found, position, M)  # (M,)
        neighbours[j, 0, :M] = previous
        # The next of each found previous is the vertex itself; the missing ones all write M to row M.
        neighbours[j, 1].index_put_((previous,), torch.where(found, all_vertices, M))
    return vertex, barycentric, neighbours


def bilateral_filter(images, values, sigma_rgb, sigma_xy):
    """W · values with the permutohedral lattice, per image and channel (the release's filter).

    images: (B, 3, h, w) RGB in 0–255 (only the lattice; no gradient flows into them).
    values: (B, K, h, w) any float dtype; the splat, blur and slice run in that dtype, the lattice
        (vertex keys and barycentric weights) always in float32, as in the C++.
    sigma_rgb, sigma_xy: the Gaussian's widths in colour levels and pixels.
    Returns (B, K, h, w). Linear in values; differentiable with respect to values.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"crf_loss.py: bilateral_filter expects images (B, 3, h, w) RGB 0–255, "
                         f"got shape {tuple(images.shape)}")
    if values.dim() != 4 or values.shape[0] != images.shape[0] or values.shape[2:] != images.shape[2:]:
        raise ValueError(f"crf_loss.py: bilateral_filter expects values (B, K, h, w) matching images "
                         f"{tuple(images.shape)}, got {tuple(values.shape)}")
    if not (sigma_rgb > 0 and sigma_xy > 0):
        raise ValueError(f"crf_loss.py: sigma_rgb and sigma_xy must be positive, got {sigma_rgb}, {sigma_xy}")
    B, K, h, w = values.shape
    N = h * w
    d = FEATURE_DIM
    if B * N == 0 or K == 0:
        return torch.zeros_like(values)

    features = lattice_features(images, sigma_rgb, sigma_xy)  # (B, N, d)
    vertex, barycentric, neighbours = permutohedral_lattice(features)  # (P, d+1), (P, d+1), (d+1, 2, M+1)
    M = neighbours.shape[2] - 1
    weight = barycentric.to(values.dtype)  # (P, d+1)
    pixel_values = values.permute(0, 2, 3, 1).reshape(B * N, K)  # (P, K)

    # Splat: every vertex gathers the barycentric-weighted values of the pixels around it.
    lattice = values.new_zeros(M + 1, K)  # (M+1, K): row M is the missing vertex, always 0
    for corner in range(d + 1):
        lattice.index_add_(0, vertex[:, corner], weight[:, corner, None] * pixel_values)  # (M+1, K)

    # Blur: v ← v + ½(v_prev + v_next) along each lattice axis; row M is the missing vertex (0).
    for j in range(d + 1):
        previous, following = lattice.index_select(0, neighbours[j, 0]), lattice.index_select(0, neighbours[j, 1])
        lattice = torch.add(lattice, previous + following, alpha=0.5)  # (M+1, K); ½·x is exact

    # Slice: every pixel reads its d+1 vertices back with the same weights, times α = 1/(1 + 2^-d).
    alpha = slice_alpha(d)
    sliced_weight = (barycentric * alpha).to(values.dtype)  # (P, d+1), rounded as the C++ does
    out = values.new_zeros(B * N, K)  # (P, K)
    for corner in range(d + 1):
        out += sliced_weight[:, corner, None] * lattice.index_select(0, vertex[:, corner])  # (P, K)
    return out.view(B, h, w, K).permute(0, 3, 1, 2)  # (B, K, h, w)


class DenseCRFEnergy(torch.autograd.Function):
    """E = −(1/B) Σ S̃·G·(W S̃) with the release's gradient −(2/B)·ROI·G·(W S̃) (see module docstring)."""

    @staticmethod
    def forward(ctx, probs, images, roi, unlabelled, sigma_rgb, sigma_xy):
        """probs (B, C, h, w); images (B, 3, h, w) RGB 0–255; roi (B, h, w) in {0, 1} of probs' dtype;
        unlabelled (B, h, w) bool. Returns the scalar energy E."""
        B = probs.shape[0]
        # G = ROI − max_k S_k; 1 where unlabelled; then max(G, 0) (the release's order).
        gate = (roi - probs.amax(dim=1)).masked_fill(unlabelled, 1.0).clamp(min=0)  # (B, h, w)
        masked_probs = probs * roi[:, None]  # S̃ (B, C, h, w)
        gated_filtered = bilateral_filter(images, masked_probs, sigma_rgb, sigma_xy) * gate[:, None]  # G·W S̃
        energy = -(masked_probs * gated_filtered).sum() / B  # E = −(1/B) Σ S̃·G·(W S̃)
        ctx.save_for_backward(gated_filtered * roi[:, None])  # ROI·G·W S̃ (B, C, h, w)
        ctx.batch_size = B
        return energy

    @staticmethod
    def backward(ctx, grad_energy):
        (roi_gated_filtered,) = ctx.saved_tensors
        grad_probs = -2.0 / ctx.batch_size * grad_energy * roi_gated_filtered  # −(2/B)·ROI·G·(W S̃) (B, C, h, w)
        return grad_probs, None, None, None, None, None


class DenseCRFLoss(nn.Module):
    """L_reg = weight · E on a downscaled copy of the inputs (the release's DenseEnergyLoss).

    weight: the layer's factor (the release's 1e-7; the training loss adds 0.01 of it on top).
    sigma_rgb, sigma_xy: the bilateral kernel's widths at full resolution; σ_xy · scale_factor is
        given to the filter.
    scale_factor: the resolution the energy is computed at (image, ROI and label nearest, the
        probabilities bilinear with align_corners=False).

    `forward(images (B, 3, H, W) RGB 0–255, probs (B, C, H, W) softmax, roi (B, H, W) 1 inside the
    valid box, label (B, H, W) the seg target, ignore_index=255) -> scalar`. Only probs receives a
    gradient (the release's, see the module docstring). An empty ROI gives exactly 0; a crop whose
    label is all ignore_index gives the ungated energy (G = 1), finite. float16 / bfloat16 probs
    are computed in float32.
    """

    def __init__(self, weight=1e-7, sigma_rgb=15, sigma_xy=100, scale_factor=0.5):
        super().__init__()
        if not (sigma_rgb > 0 and sigma_xy > 0 and scale_factor > 0):
            raise ValueError("crf_loss.py: DenseCRFLoss needs positive sigma_rgb, sigma_xy and scale_factor, "
                             f"got {sigma_rgb}, {sigma_xy}, {scale_factor}")
        self.weight = weight
        self.sigma_rgb = sigma_rgb
        self.sigma_xy = sigma_xy
        self.scale_factor = scale_factor

    def forward(self, images, probs, roi, label, ignore_index=255):
        B, C, H, W = probs.shape
        if images.shape != (B, 3, H, W) or roi.shape != (B, H, W) or label.shape != (B, H, W):
            raise ValueError(
                "crf_loss.py: DenseCRFLoss expects images (B, 3, H, W), probs (B, C, H, W), roi and label "
                f"(B, H, W); got images {tuple(images.shape)}, probs {tuple(probs.shape)}, "
                f"roi {tuple(roi.shape)}, label {tuple(label.shape)}")
        if images.numel() and images.min() < -1:
            raise ValueError("crf_loss.py: DenseCRFLoss expects RGB images in 0–255, got negative values: "
                             "pass the denormalised image (image · std + mean), not the network input")
        scale = self.scale_factor
        probs = probs.to(torch.promote_types(probs.dtype, torch.float32))  # (B, C, H, W)
        # Half resolution as the release: image, ROI and label nearest (the top-left pixel of each 2×2),
        # probabilities bilinear (align_corners=False: the 2×2 mean).
        small_images = F.interpolate(images.detach().float(), scale_factor=scale, mode="nearest")  # (B, 3, h, w)
        small_probs = F.interpolate(probs, scale_factor=scale, mode="bilinear", align_corners=False)  # (B, C, h, w)
        small_roi = F.interpolate(roi[:, None].to(probs.dtype), scale_factor=scale, mode="nearest")[:, 0]  # (B, h, w)
        ignored = (label == ignore_index)[:, None].to(probs.dtype)  # (B, 1, H, W)
        unlabelled = F.interpolate(ignored, scale_factor=scale, mode="nearest")[:, 0] > 0.5  # (B, h, w)
        energy = DenseCRFEnergy.apply(small_probs, small_images, small_roi.detach(), unlabelled,
                                      self.sigma_rgb, self.sigma_xy * scale)
        return self.weight * energy

    def extra_repr(self):
        return (f"weight={self.weight}, sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, "
                f"scale_factor={self.scale_factor}")
