"""The stages of one AFA training step, as functions of tensors and numbers (paper §3, Fig. 2).

    images ─► multi-scale CAM (§3.1) ─► PAR label (§3.3) ─► affinity labels ─► L_aff (§3.2)
                  │
                  └► random walk with the learned affinity (§3.2) ─► PAR ─► AFA pseudo label
                                                                        ─► L_seg, L_reg (§3.4)

One chain makes every pseudo label of the project (`make_pseudo_labels`): the training step's,
the validation's (`metrics.py`), the pseudo-label table's (`evaluate.py`) and the figures'
(`visualize.py`), with what differs between them as explicit arguments (which labels, the CAM
label's thresholds, which pass the walk's affinity comes from) and the numbers in one
`LabelSettings`; `bench.py` times the training step by its stage labels (`record_function`). So
what they measure is what the network trains on. The method itself lives below this module
(`cam.py`, `par.py`, `attention_affinity.py`, `random_walk.py`, `crf_loss.py`, `model.py`, and
the speed variants of `fast.py`); here it is put in order.
The pseudo labels are made without gradient and in float32 whatever autocast surrounds the call
(`--amp` covers the network's forward and backward only); `LabelSettings(cam_bf16=True)` runs
the CAM passes alone in bfloat16.

The paper's ablations (§4.3, Tables 3 and 4) change single stages: the seg branch supervised by
the CAM label, the PAR label or the AFA label (`make_pseudo_labels(need=...)`), and the random
walk with the raw multi-head self-attention instead of the learned affinity
(`LabelSettings(propagate_with="attention")`: `attention_affinity.mhsa_affinity` of the same
pass's attention).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.profiler import record_function  # the stage labels bench.py times the step by

import fast
from attention_affinity import window_mask
from cam import (cam_to_label, multi_scale_cam, refine_cams_with_par, refine_propagated_with_par,
                 valid_box_mask)
from crf_loss import DenseCRFLoss
from data import IMAGENET_MEAN, IMAGENET_STD  # the normalisation undone for PAR and L_reg
from model import PAIRWISE  # what the walk propagates with (§3.2; Table 4's "prop. with MHSA")
from random_walk import random_walk_cams

ENCODER_STRIDE = 16  # the stride of the encoder's last stage: one token per 16 × 16 pixels


@functools.lru_cache(maxsize=8)  # made once per device: a copy from the host waits for the GPU
def mean_and_std(device: torch.device, dtype: torch.dtype) -> tuple:
    """IMAGENET_MEAN and IMAGENET_STD as (1, 3, 1, 1) tensors on `device` (never written to)."""
    return tuple(torch.tensor(values, dtype=dtype, device=device).view(1, 3, 1, 1)
                 for values in (IMAGENET_MEAN, IMAGENET_STD))


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, H, W) back to RGB in [0, 1]: x·std + mean, / 255."""
    mean, std = mean_and_std(images.device, images.dtype)  # (1, 3, 1, 1) each
    return (images * std + mean) / 255.0


def par_image(images: torch.Tensor) -> torch.Tensor:
    """The image PAR refines with (paper §3.3), made as the release makes it: normalised images
    (B, 3, H, W) → x·std + mean, truncated toward zero to whole values (the release's cast to
    uint8), / 255 → RGB in [0, 1] on the 1/255 grid.

    The truncation is kept on purpose. The pixels of data.py are whole values, and x·std + mean
    gives each back only up to float rounding, so a value that lands just below its integer
    (199.99998) becomes one step lower (199). PAR's kernel divides colour differences by the
    local standard deviation, so such steps move the arg-max of some PAR-label pixels; without
    the cast the labels, and with them the whole training trajectory, part from the release's.
    (The clamp to 0–255 changes nothing for normalised pixels; it keeps other inputs in the
    range the cast is defined on.)"""
    mean, std = mean_and_std(images.device, images.dtype)  # (1, 3, 1, 1) each
    return (images * std + mean).clamp(0, 255).trunc() / 255.0


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
# The implementation: the plain forms, or the speed variants of fast.py (one switch)
# =============================================================================================
class Paths(NamedTuple):
    """The label chain's stage-1 and stage-2 functions: the plain forms of cam.py, or fast.py's."""
    multi_scale_cam: Callable = multi_scale_cam
    refine_cams_with_par: Callable = refine_cams_with_par


def choose_paths(model, speed_paths: bool, variants=fast.VARIANTS) -> Paths:
    """The one choice point of the implementation (`--speed-paths`), made once per network where
    it is built: off, the network and the label chain run the plain forms of the method files
    only; on, `variants` of fast.py (all by default), bound onto `model` and returned as the
    chain's stage functions. The same numbers up to float rounding either way
    (tests/test_fast.py)."""
    variants = tuple(variants) if speed_paths else ()
    fast.apply(model, variants)
    return paths_of(model)


def paths_of(model) -> Paths:
    """The chain's stage functions of the variants chosen for `model` (`choose_paths`)."""
    return Paths(**fast.chain(fast.bound(model) or ()))


# =============================================================================================
# Stages 1–3: CAM → label → PAR (→ random walk → PAR), without gradient: the one label chain
# =============================================================================================
THRESHOLDS = ("train", "eval")     # the CAM label's bands: low / high (training), bkg_score alone
AFFINITY_FROM = ("cam_pass", "forward")  # the walk's affinity: the CAM pass's largest scale, or
                                         # the scale-1.0 forward (the release's validation)


@dataclass(frozen=True)
class LabelSettings:
    """How the pseudo-label chain runs (paper §3.1–3.3): its numbers, the paper's defaults; what
    differs between its callers (the training step's settings by default, `for_evaluation` for
    the others); the implementation of its stages (`choose_paths`; the plain forms by default)."""
    cam_scales: tuple = (1.0, 0.5, 1.5)  # scales of the multi-scale CAM (§3.1)
    low: float = 0.35                    # background threshold below which a pixel is background
    high: float = 0.55                   # … above which it is its class; ignored in between
    bkg_score: float = 0.45              # the single threshold of the CAM label at evaluation
    radius: int = 8                      # the random walk's window on the stride-16 grid (§3.2)
    propagate_with: str = "affinity"     # the walk's pairwise scores: "affinity" or "attention" (MHSA)
    thresholds: str = "train"            # the CAM label: three bands ("train") or bkg_score ("eval")
    affinity_from: str = "cam_pass"      # the walk's affinity: "cam_pass" or "forward" (`forward`)
    cam_bf16: bool = False               # the CAM passes in bfloat16 (training's --cam-bf16)
    cam_bn_stats: bool | None = None     # the CAM passes update the decoder's BatchNorm statistics
    reuse_forward_cam: bool = False      # the forward's CAMs stand for the scale-1.0 pass's
    paths: Paths = Paths()               # the stage functions: plain, or fast.py's (`choose_paths`)

    def __post_init__(self):
        if (self.propagate_with not in PAIRWISE or self.thresholds not in THRESHOLDS
                or self.affinity_from not in AFFINITY_FROM):
            raise ValueError(f"propagate_with, thresholds and affinity_from must be in "
                             f"{PAIRWISE}, {THRESHOLDS} and {AFFINITY_FROM}, got "
                             f"{self.propagate_with!r}, {self.thresholds!r}, {self.affinity_from!r}")

    @classmethod
    def from_config(cls, cfg, model) -> "LabelSettings":
        """The training step's settings of a run's configuration (train.Config), with the stage
        functions chosen for `model` (`choose_paths`; by its `speed_paths` if none were yet)."""
        paths = (paths_of(model) if fast.bound(model) is not None
                 else choose_paths(model, cfg.speed_paths))
        return cls(cam_scales=tuple(cfg.cam_scales), low=cfg.low, high=cfg.high,
                   bkg_score=cfg.bkg_score, radius=cfg.radius, propagate_with=cfg.propagate_with,
                   cam_bf16=cfg.cam_bf16, cam_bn_stats=cfg.cam_bn_stats,
                   reuse_forward_cam=cfg.reuse_forward_cam, paths=paths)

    def for_evaluation(self, affinity_from: str = "cam_pass") -> "LabelSettings":
        """The same numbers for the labels of a network in eval mode (validation, evaluate.py,
        the figures): the CAM label at bkg_score, none of the training step's options."""
        return dataclasses.replace(self, thresholds="eval", affinity_from=affinity_from,
                                   cam_bf16=False, cam_bn_stats=None, reuse_forward_cam=False)


class PseudoLabels(NamedTuple):
    """The chain's results in its order; what was not asked for is None."""
    cams: torch.Tensor | None = None      # (B, C-1, H, W) the multi-scale CAMs in [0, 1] (§3.1)
    cam: torch.Tensor | None = None       # (B, H, W) the CAM label (§3.1)
    par: torch.Tensor | None = None       # (B, H, W) the CAM label refined with PAR (§3.3)
    affinity: torch.Tensor | None = None  # (B, N, N) what the walk used; None without a walk
    walked: torch.Tensor | None = None    # (B, C, H, W) the CAMs walked at background `low`
    walk: torch.Tensor | None = None      # (B, H, W) arg-max of the walk at background `low`, no PAR
    afa: torch.Tensor | None = None       # (B, H, W) the AFA pseudo label: walks, then PAR (§3.2)


LABELS = ("cam", "par", "walk", "afa")


@torch.no_grad()
def make_pseudo_labels(model, par, batch: dict, settings: LabelSettings, need=("par", "afa"),
                       forward=None) -> PseudoLabels:
    """Every pseudo label of the project, for batch["image"] (B, 3, H, W) with batch["cls_labels"]
    (B, C-1) and batch.get("valid_box") (B, 4) (None: the whole crop): training, validation,
    evaluate.py and the figures.

    `model` runs in the mode it is in (training: train mode, stochastic depth active; the
    others: eval mode). What differs between the callers is explicit:

    need: which of `LABELS` to make (the others are None): "cam" the CAM label, "par" the PAR
      label (§3.3), "walk" the arg-max of the random walk at background `low` without PAR (the
      release's validation), "afa" the AFA pseudo label (§3.2: walks at low and high, PAR).
    settings.thresholds: "train" for the three-band CAM label (v ≤ low → 0, low < v ≤ high → 255,
      else the class), "eval" for the single threshold bkg_score (v ≤ bkg_score → 0).
    settings.affinity_from: the walk's affinity at the largest CAM scale of the un-flipped images
      from the CAM pass itself ("cam_pass": same stochastic-depth draws), or at scale 1.0 from the
      eval-mode forward ("forward", the release's validation: `forward.affinity` (B, N, N)).
    settings.propagate_with: "affinity" walks with the learned affinity, "attention" with the
      raw MHSA maps of the same blocks and pass (`mhsa_affinity`; paper Table 4).
    settings.cam_bf16, cam_bn_stats, reuse_forward_cam: how training runs the CAM passes
      (`multi_scale_cams`; `forward.cams` are the reused CAMs, where `forward` is given).
    forward: the AFAOutput of the network's forward on these images, where the settings read it.
    """
    if not set(need) <= set(LABELS):
        raise ValueError(f"need must be a subset of {LABELS}, got {need}")
    images, cls_labels, valid_box = batch["image"], batch["cls_labels"], batch.get("valid_box")
    # The walk's background scores: low for "walk", low and high for "afa"; none: no walk.
    walk_scores = [t for t, asked in ((settings.low, "walk" in need or "afa" in need),
                                      (settings.high, "afa" in need)) if asked]
    with label_precision(images.device.type):
        # --- Stage 1: multi-scale CAM (paper §3.1) and the CAM label ---------------------------
        with record_function("multi-scale CAM"):
            cams, affinity = multi_scale_cams(
                model, images, settings,
                forward_cams=(forward.cams.detach() if settings.reuse_forward_cam and forward
                              else None))
        with record_function("CAM label"):                                 # (B, C-1, H, W) cams
            cam = (cam_label(cams, cls_labels, valid_box, settings)
                   if "cam" in need else None)                             # (B, H, W)
        # --- Stage 2: the CAM label refined with PAR (paper §3.3) ------------------------------
        with record_function("PAR label"):
            pixels = par_image(images.float())                              # (B, 3, H, W) in [0, 1]
            par_label = (settings.paths.refine_cams_with_par(
                par, pixels, cams, cls_labels, low=settings.low, high=settings.high,
                valid_box=valid_box) if "par" in need else None)          # (B, H, W)
        if not walk_scores:
            return PseudoLabels(cams=cams, cam=cam, par=par_label)
        # --- Stage 3: random walk with the learned affinity (or the MHSA maps), PAR (§3.2) ----
        scale = max(settings.cam_scales)
        if settings.affinity_from == "forward":   # the release's validation: scale 1.0, eval mode
            scale = 1.0
            affinity = (forward.affinity if settings.propagate_with == "affinity" else
                        model.cam(images, bn_stats=False, pairwise="attention")[1]
                        ).float()                                          # (B, N, N)
        H, W = images.shape[-2:]
        grid = token_grid(int(scale * H)), token_grid(int(scale * W))     # the affinity's (h, w)
        mask = window_mask(*grid, settings.radius, device=cams.device)    # (N, N)
        with record_function("random walk"):
            walked = [random_walk_cams(cams, affinity, cls_labels, grid, mask, t)
                      for t in walk_scores]                                # (B, C, H, W) each
        with record_function("AFA label (PAR)"):
            afa = (refine_propagated_with_par(par, pixels, *walked, cls_labels, valid_box)
                   if "afa" in need else None)                             # (B, H, W)
    walk = walked[0].argmax(1) if "walk" in need else None                 # (B, H, W)
    return PseudoLabels(cams=cams, cam=cam, par=par_label, affinity=affinity, walked=walked[0],
                        walk=walk, afa=afa)


def multi_scale_cams(model, images: torch.Tensor, settings: LabelSettings, *,
                     forward_cams: torch.Tensor | None = None) -> tuple:
    """Stage 1: the multi-scale CAMs (B, C-1, H, W) of images (B, 3, H, W) at `settings.cam_scales`
    and the walk's pairwise scores (B, N, N) at the largest scale, of the un-flipped images, from
    the same pass: the learned affinity, or the MHSA affinity of the same logits where
    `settings.propagate_with` is "attention" (`AFANet.cam`'s `pairwise`); both float32.

    The training step's options: `cam_bf16` runs the passes in bfloat16; `cam_bn_stats` (None:
    the model's default) whether the passes update the decoder's BatchNorm statistics in train
    mode, as in the release; `forward_cams` (B, C-1, h, w) the training forward's CAMs, reused at
    scale 1.0 (faster; other stochastic-depth draws, so other numbers).
    """
    options = {} if settings.cam_bn_stats is None else {"bn_stats": settings.cam_bn_stats}
    with label_precision(images.device.type, settings.cam_bf16):
        cams, affinity = settings.paths.multi_scale_cam(
            model, images, settings.cam_scales, forward_cams=forward_cams,
            pairwise=settings.propagate_with, **options)                  # (B, C-1, H, W), (B, N, N)
    return cams.float(), affinity.float()


def cam_label(cams: torch.Tensor, cls_labels: torch.Tensor, valid_box: torch.Tensor | None,
              settings: LabelSettings) -> torch.Tensor:
    """The CAM label (B, H, W) of cams (B, C-1, H, W): three bands low / high ("train") or the
    single threshold bkg_score ("eval"), as `settings.thresholds` says; 255 outside the valid box."""
    if settings.thresholds == "train":
        return cam_to_label(cams, cls_labels, low=settings.low, high=settings.high,
                            valid_box=valid_box)
    return cam_to_label(cams, cls_labels, bkg_score=settings.bkg_score, valid_box=valid_box)


@torch.no_grad()
def cam_bn_stats_passes(model, images: torch.Tensor, settings: LabelSettings) -> None:
    """The CAM passes of the classification-only phase, for the decoder's BatchNorm statistics
    alone. The release runs its multi-scale CAM on every iteration, in train mode, before it
    knows whether the labels are used, and each pass updates those statistics; this does the same
    passes (same stochastic-depth draws, same statistics) and keeps nothing else."""
    with label_precision(images.device.type, settings.cam_bf16):
        settings.paths.multi_scale_cam(model, images, settings.cam_scales, bn_stats=True)


# =============================================================================================
# The losses (paper §3.4)
# =============================================================================================
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



# L_reg with the release's layer: weight 1e-7, σ_rgb 15, σ_xy 100, at half resolution.
DENSE_CRF_LOSS = DenseCRFLoss(weight=1e-7, sigma_rgb=15, sigma_xy=100, scale_factor=0.5)


def reg_loss(seg_logits_up: torch.Tensor, images: torch.Tensor, valid_box: torch.Tensor | None,
             seg_target: torch.Tensor) -> torch.Tensor:
    """L_reg (paper §3.4), the dense-CRF energy loss of the release (crf_loss.DenseCRFLoss).

    seg_logits_up: (B, C, H, W) seg logits upsampled to the crop (the same as L_seg's), their
    softmax not detached; images (B, 3, H, W) normalised (denormalised here to RGB 0–255);
    valid_box (B, 4) the ROI (None: the whole crop); seg_target (B, H, W) the step's seg target,
    255 unlabelled.
    Returns the scalar 1e-7 · E; the training loss adds `reg_weight` (0.01) of it.
    """
    H, W = seg_logits_up.shape[-2:]
    probs = seg_logits_up.float().softmax(dim=1)                            # (B, C, H, W)
    # RGB 0–255 (clamped: a no-op for real images, a guard for inputs that are not normalised pixels)
    rgb = (denormalize(images.float()) * 255.0).clamp(0, 255)              # (B, 3, H, W)
    roi = valid_box_mask(valid_box, images.shape[0], H, W, images.device).float()  # (B, H, W)
    return DENSE_CRF_LOSS(rgb, probs, roi, seg_target)                      # (B, H, W) roi
