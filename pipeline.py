"""The stages of one AFA training step, as functions of tensors and numbers (paper §3, Fig. 2).

    images ─► multi-scale CAM (§3.1) ─► PAR label (§3.3) ─► affinity labels ─► L_aff (§3.2)
                  │
                  └► random walk with the learned affinity (§3.2) ─► PAR ─► AFA pseudo label
                                                                        ─► L_seg (§3.4)

`train.py` chains these stages in its step; the validation (`metrics.py`), the figures
(`visualize.py`) and the pseudo-label table (`evaluate.py`) call the same functions, so what they
measure is what the network trains on. The method itself lives below this module (`cam.py`,
`par.py`, `attention_affinity.py`, `random_walk.py`, `model.py`); here it is put in order. The
pseudo labels are made without gradient and in float32 whatever autocast surrounds the call
(`--amp` covers the network's forward and backward only); `cam_bf16=True` runs the CAM passes
alone in bfloat16.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from attention_affinity import affinity_labels, window_mask
from cam import multi_scale_cam, refine_cams_with_par, refine_propagated_with_par
from data import IMAGENET_MEAN, IMAGENET_STD
from random_walk import propagate

ENCODER_STRIDE = 16  # the stride of the encoder's last stage: one token per 16 × 16 pixels


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, H, W) back to RGB in [0, 1], the input PAR sees in the release."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean) / 255.0


def token_grid(size: int, stride: int = ENCODER_STRIDE) -> int:
    """Side of the stride-16 token grid for an input side `size`: ⌈size / 16⌉ (each patch
    embedding pads)."""
    return -(-size // stride)


def label_precision(device_type: str, cam_bf16: bool = False):
    """The precision of the pseudo labels: float32, also inside an autocast region, or bfloat16
    for the CAM passes when `cam_bf16` asks for it (faster where bf16 is; changes the numbers)."""
    if cam_bf16:
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return torch.autocast(device_type, enabled=False)


# =============================================================================================
# Stages 1–3: CAM → PAR label (→ random walk → AFA label), without gradient
# =============================================================================================
class PseudoLabels(NamedTuple):
    par: torch.Tensor            # (B, H, W) the CAM label refined with PAR (paper §3.3)
    afa: torch.Tensor | None     # (B, H, W) the AFA pseudo label (paper §3.2); None if not asked


@torch.no_grad()
def make_pseudo_labels(model, par, images: torch.Tensor, cls_labels: torch.Tensor,
                       valid_box: torch.Tensor | None, *, scales=(1.0, 0.5, 1.5),
                       low: float = 0.35, high: float = 0.55, radius: int = 8,
                       need_afa: bool = True, cam_bf16: bool = False,
                       decoder_stats: bool | None = None,
                       forward_cams: torch.Tensor | None = None) -> PseudoLabels:
    """The step's pseudo labels for images (B, 3, H, W) with cls_labels (B, C-1), valid_box (B, 4).

    `model` has the `cam(x)` of `multi_scale_cam` and runs in the mode it is in (in training,
    train mode: stochastic depth is active and, as in the release, the CAM passes update the
    decoder's BatchNorm statistics; `decoder_stats=False` skips that, None leaves it to `cam`).
    `forward_cams` (B, C-1, h, w): the training forward's CAMs, reused at scale 1.0 when given
    (faster; other stochastic-depth draws, so other numbers).
    """
    with label_precision(images.device.type):
        # --- Stage 1: multi-scale CAM, affinity at the largest scale (paper §3.1) --------------
        with label_precision(images.device.type, cam_bf16):
            cams, affinity = multi_scale_cam(
                model, images, scales, decoder_stats=decoder_stats, partial_affinity=True,
                forward_cams=forward_cams)                                 # (B, C-1, H, W), (B, N, N)
        cams, affinity = cams.float(), affinity.float()
        # --- Stage 2: the CAM label refined with PAR (paper §3.3) ------------------------------
        pixels = denormalize(images.float())                                # (B, 3, H, W) in [0, 1]
        par_label = refine_cams_with_par(par, pixels, cams, cls_labels, low=low, high=high,
                                         valid_box=valid_box)              # (B, H, W)
        if not need_afa:
            return PseudoLabels(par_label, None)
        # --- Stage 3: random walk with the learned affinity, refined with PAR (paper §3.2) -----
        afa_label = afa_pseudo_label(par, pixels, cams, affinity, cls_labels, valid_box,
                                     max(scales), low, high, radius)       # (B, H, W)
    return PseudoLabels(par_label, afa_label)


@torch.no_grad()
def cam_statistics_passes(model, images: torch.Tensor, scales=(1.0, 0.5, 1.5),
                          cam_bf16: bool = False) -> None:
    """The CAM passes of the classification-only phase, for the decoder's BatchNorm statistics
    alone. The release runs its multi-scale CAM on every iteration, in train mode, before it
    knows whether the labels are used, and each pass updates those statistics; this does the same
    passes (same stochastic-depth draws, same statistics) and keeps nothing else."""
    with label_precision(images.device.type, cam_bf16):
        multi_scale_cam(model, images, scales, decoder_stats=True, partial_affinity=True)


def random_walk_cams(cams: torch.Tensor, affinity: torch.Tensor, cls_labels: torch.Tensor,
                     scale: float, bkg_score: float, radius: int) -> torch.Tensor:
    """Propagate the label-masked CAMs with the learned affinity (paper §3.2), back at the image size.

    cams (B, C-1, H, W) in [0, 1]; affinity (B, N, N) computed on the images resized by `scale`,
    so its grid is h × w = token_grid(int(scale·H)) × token_grid(int(scale·W)).
    Returns (B, C, H, W), background first, absent classes 0.
    """
    B, _, H, W = cams.shape
    h, w = token_grid(int(scale * H)), token_grid(int(scale * W))
    label_cams = cams * cls_labels[:, :, None, None]                       # (B, C-1, H, W)
    label_cams = F.interpolate(label_cams, size=(h, w), mode="bilinear",
                               align_corners=False)                        # (B, C-1, h, w)
    mask = window_mask(h, w, radius, device=cams.device)                   # (N, N)
    walked = propagate(label_cams, affinity, mask, cls_labels, bkg_score)  # (B, C, h, w)
    return F.interpolate(walked, size=(H, W), mode="bilinear", align_corners=False)  # (B, C, H, W)


def afa_pseudo_label(par, pixels: torch.Tensor, cams: torch.Tensor, affinity: torch.Tensor,
                     cls_labels: torch.Tensor, valid_box: torch.Tensor | None, scale: float,
                     low: float, high: float, radius: int) -> torch.Tensor:
    """The AFA pseudo label (paper §3.2): random walk at both thresholds, PAR in the valid box.

    pixels (B, 3, H, W) in [0, 1]; cams (B, C-1, H, W); affinity (B, N, N) at `scale`.
    Returns (B, H, W) int64 with 255 where ignored.
    """
    walked_low, walked_high = (random_walk_cams(cams, affinity, cls_labels, scale, t, radius)
                               for t in (low, high))                       # (B, C, H, W) each
    return refine_propagated_with_par(par, pixels, walked_low, walked_high, cls_labels, valid_box)


# =============================================================================================
# Stage 4 and the losses (paper §3.2, §3.4)
# =============================================================================================
def affinity_targets(pseudo_label: torch.Tensor, radius: int) -> torch.Tensor:
    """Affinity labels (B, N, N) in {0, 1, 255} of a pseudo label (B, H, W) on its stride-16
    grid, inside the window of `radius` tokens (paper §3.2)."""
    h, w = token_grid(pseudo_label.shape[-2]), token_grid(pseudo_label.shape[-1])
    mask = window_mask(h, w, radius, device=pseudo_label.device)           # (N, N)
    return affinity_labels(pseudo_label, grid=(h, w), mask=mask)           # (B, N, N)


def seg_loss(seg_logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """L_seg (paper §3.4), balanced as in the release: ½ (CE over background pixels + CE over
    foreground pixels).

    seg_logits: (B, C, H, W) at the label's size; label: (B, H, W) int64 with `ignore_index`.
    Each half is a mean over its own pixels. A half with no pixel contributes 0: the release's
    0/0 gives NaN there (a crop that is all background, all foreground or all ignored).
    """
    ce = F.cross_entropy(seg_logits, label, ignore_index=ignore_index, reduction="none")  # (B, H, W)
    valid = label != ignore_index
    background = (valid & (label == 0)).to(ce.dtype)
    foreground = (valid & (label != 0)).to(ce.dtype)
    bg_loss = (ce * background).sum() / background.sum().clamp(min=1)
    fg_loss = (ce * foreground).sum() / foreground.sum().clamp(min=1)
    return 0.5 * (bg_loss + fg_loss)


def upsample(logits: torch.Tensor, size: tuple) -> torch.Tensor:
    """Logits (B, C, h, w) → (B, C, H, W), bilinear, in float32: the losses are computed in fp32."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)

