"""Pixel-adaptive refinement (PAR): smooth label maps along the image's low-level structure.

PAR refines CAM-derived maps so that they follow colour edges (paper §3.3, "Pixel-Adaptive
Refinement"). Every pixel i looks at 8 neighbours j at each dilation d (48 with the default
six dilations, replicate padding at the border) and gets an affinity

    κ(i, j)  = −( |I_i − I_j| / (σ_i + ε) / w1 )²,  averaged over the colour channels,
    κp(i, j) = −( p(i, j) / (σ_p + ε) / w1 )²,        p = d (axial) or √2·d (diagonal),
    a(i, j)  = softmax_j κ(i, j) + w2 · softmax_j κp(i, j),

with σ_i the unbiased standard deviation of the 48 neighbour values of pixel i (per colour channel)
and σ_p that of the 48 distances. A mask is then refined by `num_iter` steps of m_i ← Σ_j a(i, j) m_j.
In training PAR runs on the image and CAM-derived maps downsampled by 2 (see cam.py).

As in the authors' release, a(i, j) is not renormalised: each row sums to 1 + w2, so a constant
mask c becomes c · (1 + w2)^num_iter — harmless for the arg-max taken afterwards.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The 8 neighbour directions (row step, column step), row-major over the 3 × 3 window without its
# centre. The order fixes the layout of the P = 8 · len(dilations) kernel channels.
NEIGHBOUR_DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# Guards the divisions by σ in flat regions (σ = 0), where every |I_i − I_j| is 0 as well.
STD_EPS = 1e-8


class PAR(nn.Module):
    """Pixel-adaptive refinement with fixed (non-learned) affinities.

    `forward(images (B, 3, H, W), masks (B, K, h, w)) -> (B, K, H, W)`. Any number of colour channels
    works (κ is averaged over them); each mask channel is refined independently and linearly, so
    channels may be stacked freely. PAR makes training targets: it runs without gradient.
    """

    def __init__(self, dilations=(1, 2, 4, 8, 12, 24), num_iter=10, w1=0.3, w2=0.01):
        super().__init__()
        dilations = tuple(dilations)
        if not dilations or any(not isinstance(d, int) or d < 1 for d in dilations):
            raise ValueError(f"dilations must be a non-empty sequence of positive ints, got {dilations}")
        if not isinstance(num_iter, int) or num_iter < 0:
            raise ValueError(f"num_iter must be a non-negative int, got {num_iter}")
        if w1 <= 0:
            raise ValueError(f"w1 must be positive, got {w1}")
        self.dilations = dilations
        self.num_iter = num_iter
        self.w1 = w1
        self.w2 = w2
        # Neighbour j of pixel (y, x) is pixel (y + dy, x + dx), clamped to the image.
        self.offsets = tuple((dy * d, dx * d) for d in dilations for dy, dx in NEIGHBOUR_DIRECTIONS)
        self.num_neighbours = len(self.offsets)  # P
        # Padding once by the largest offset lets every neighbour be a strided view of one tensor.
        self.pad = max(dilations)

        # The position term does not depend on the image: w2 · softmax_j κp(i, j), once.
        distance = torch.tensor([math.hypot(dy, dx) for dy, dx in self.offsets], dtype=torch.float64)  # (P,)
        position_logits = -(distance / (distance.std() + STD_EPS) / w1) ** 2  # κp, unbiased σ_p
        position_affinity = w2 * position_logits.softmax(0)  # (P,)
        self.register_buffer(
            "position_affinity",
            position_affinity.to(torch.float32).view(1, self.num_neighbours, 1, 1),  # (1, P, 1, 1)
            persistent=False,
        )

    def neighbours(self, x):
        """The P neighbours of every pixel as views: list of P tensors (B, c, H, W), replicate-padded.

        Replicate padding by the largest dilation gives the same values as clamping each neighbour's
        coordinates to the image, even where the dilation exceeds the image size.
        """
        H, W = x.shape[-2:]
        pad = self.pad
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # (B, c, H + 2·pad, W + 2·pad)
        return [padded[..., pad + dy:pad + dy + H, pad + dx:pad + dx + W] for dy, dx in self.offsets]

    @torch.no_grad()
    def kernel(self, images):
        """Affinities a(i, j) for images (B, 3, H, W) -> (B, P, H, W); each row sums to 1 + w2."""
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a float (B, 3, H, W) tensor, got {tuple(images.shape)} {images.dtype}")
        P = self.num_neighbours
        # In-place ops below on freshly allocated tensors: PAR makes targets, it is never differentiated.
        difference = torch.stack(self.neighbours(images), dim=2)  # (B, 3, P, H, W)
        difference -= images.unsqueeze(2)  # I_j − I_i
        # σ_i: unbiased std over the P neighbours (shifting by I_i leaves it unchanged). Two passes,
        # written out, because torch.std over a middle dimension is several times slower.
        deviation = difference - difference.mean(dim=2, keepdim=True)  # (B, 3, P, H, W), a temporary
        std = deviation.square_().sum(dim=2, keepdim=True).div_(P - 1).sqrt_()  # (B, 3, 1, H, W)
        del deviation
        scale = std.add_(STD_EPS).mul_(self.w1).reciprocal_()  # 1 / ((σ_i + ε) · w1)
        # κ(i, j) = −mean_c ( |I_i − I_j| / (σ_i + ε) / w1 )²
        appearance = difference.mul_(scale).square_().mean(dim=1).neg_()  # (B, P, H, W)
        position = self.position_affinity.to(appearance.dtype)  # (1, P, 1, 1)
        return appearance.softmax(dim=1).add_(position)  # a(i, j) = softmax_j κ + w2 · softmax_j κp

    @torch.no_grad()
    def refine(self, kernel, masks):
        """Propagate masks (B, K, h, w) with affinities kernel (B, P, H, W) -> (B, K, H, W)."""
        if kernel.dim() != 4 or kernel.shape[1] != self.num_neighbours:
            raise ValueError(
                f"kernel must be (B, {self.num_neighbours}, H, W), got shape {tuple(kernel.shape)}"
            )
        if masks.dim() != 4 or masks.shape[0] != kernel.shape[0]:
            raise ValueError(
                f"masks must be (B, K, h, w) with B = {kernel.shape[0]}, got shape {tuple(masks.shape)}"
            )
        H, W = kernel.shape[-2:]
        if masks.shape[-2:] != (H, W):
            masks = F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=True)  # (B, K, H, W)
        weights = kernel.unsqueeze(2).unbind(dim=1)  # P × (B, 1, H, W), broadcast over the K masks
        for _ in range(self.num_iter):
            # m_i ← Σ_j a(i, j) m_j, accumulated one neighbour at a time: no (B, K, P, H, W) tensor.
            shifted = self.neighbours(masks)  # P × (B, K, H, W)
            refined = shifted[0] * weights[0]
            for neighbour, weight in zip(shifted[1:], weights[1:]):
                refined.addcmul_(neighbour, weight)
            masks = refined
        return masks

    def forward(self, images, masks):
        """Refine masks (B, K, h, w) along images (B, 3, H, W) -> (B, K, H, W)."""
        if images.dim() != 4 or masks.dim() != 4 or images.shape[0] != masks.shape[0]:
            raise ValueError(
                "images must be (B, 3, H, W) and masks (B, K, h, w) with the same B, got shapes "
                f"{tuple(images.shape)} and {tuple(masks.shape)}"
            )
        return self.refine(self.kernel(images), masks)
