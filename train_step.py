"""One training step of AFA (paper Fig. 2, §3.4): forward, this iteration's pseudo labels, losses.

    forward ─► multi-scale CAM ─► CAM label ─► PAR label ─► affinity labels ─► L_aff
                      │                                                          │
                      └► random walk with the learned affinity (two thresholds)  │
                           ─► PAR ─► AFA pseudo label ─► L_seg ◄─────────────────┘ + L_cls

`compute_losses` runs the stages of pipeline.py in the paper's order and returns the weighted
loss; `update` is the backward and the AdamW step, with the release's parameter groups
(`build_optimizer`). train.py's loop calls these every iteration; bench.py times the same
functions, so what it measures is what trains.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.profiler import record_function  # the stage labels bench.py times the step by

from attention_affinity import affinity_labels, affinity_loss, window_mask
from config import Config
from model import AFANet
from par import PAR
from pipeline import (LabelSettings, PseudoLabels, cam_bn_stats_passes, make_pseudo_labels,
                      reg_loss, seg_loss, token_grid, upsample)


# =============================================================================================
# The step (paper Fig. 2): forward, pseudo labels, losses
# =============================================================================================
class StepOutput(NamedTuple):
    loss: torch.Tensor           # the total loss, with graph
    terms: dict                  # detached loss terms by name
    labels: PseudoLabels | None  # the step's pseudo labels; None in the classification-only phase


def compute_losses(net, model: AFANet, par: PAR, batch: dict, step: int, cfg: Config,
                   autocast) -> StepOutput:
    """Forward, pseudo labels and losses of one step (paper §3.4); `autocast` covers the forward
    alone: the pseudo labels stay float32.

    Two handles on one network: `net` runs the forward that is backpropagated (`model`, or its
    DDP wrapper, through which alone the gradients are averaged over the processes); the label
    chain runs on the bare `model`, without gradient, outside the wrapper, whose forward would
    prepare a gradient synchronisation that these passes never use."""
    images, cls_labels, valid_box = batch["image"], batch["cls_labels"], batch["valid_box"]
    settings = LabelSettings.from_config(cfg, model)  # --speed-paths: plain or fast, bound once
    # --- forward: classification, segmentation and affinity from one pass (paper §3.1) ---------
    with record_function("forward"), autocast():
        out = net(images)
    # --- L_cls: multilabel soft margin on the globally max-pooled logits -----------------------
    cls_loss = F.multilabel_soft_margin_loss(out.cls_logits.float(), cls_labels)
    if step <= cfg.cam_iters:
        if cfg.cam_bn_stats:  # as the release: the CAM passes run, for the BatchNorm statistics
            cam_bn_stats_passes(model, images, settings)
        # Classification only. The zero-weighted terms keep every parameter in the graph (so DDP
        # needs no unused-parameter search) and give the release's zero gradients to the heads.
        zero = 0.0 * (out.seg_logits.float().sum() + out.affinity.float().sum())
        return StepOutput(cls_loss + zero, {"cls": cls_loss.detach()}, None)
    # --- stages 1–3: CAM → PAR label (→ random walk → AFA label), no gradient, float32 ---------
    seg_kind, aff_kind = label_targets(step, cfg)  # 'cam' | 'par' | 'afa' each
    labels = make_pseudo_labels(model, par, batch, settings, need={seg_kind, aff_kind}, forward=out)
    seg_target, aff_source = getattr(labels, seg_kind), getattr(labels, aff_kind)  # (B, H, W) each
    # --- stage 4: affinity labels from the pseudo label, L_aff (paper §3.2) ---------------------
    with record_function("losses"):
        grid = token_grid(images.shape[-2]), token_grid(images.shape[-1])  # the affinity's (h, w)
        window = window_mask(*grid, cfg.radius, device=images.device)     # (N, N)
        aff_labels = affinity_labels(aff_source, grid, window)            # (B, N, N)
        aff_loss = affinity_loss(out.affinity.float(), aff_labels)
        # --- L_seg: balanced cross entropy on the seg logits upsampled to the crop (paper §3.4)
        seg_logits = upsample(out.seg_logits, images.shape[-2:])               # (B, C, H, W)
        seg = seg_loss(seg_logits, seg_target)
    loss = cls_loss + cfg.seg_weight * seg + cfg.aff_weight * aff_loss
    terms = {"cls": cls_loss.detach(), "seg": seg.detach(), "aff": aff_loss.detach()}
    # --- L_reg: dense-CRF energy of the seg softmax, seg target as label, valid box as ROI (§3.4)
    if cfg.reg_weight > 0:
        with record_function("L_reg"):  # its forward: the lattice and the filter
            reg = reg_loss(seg_logits, images, valid_box, seg_target)
        loss = loss + cfg.reg_weight * reg
        terms["reg"] = reg.detach()
    return StepOutput(loss, terms, labels)


def label_targets(step: int, cfg: Config) -> tuple:
    """(seg_kind, aff_kind) at iteration `step`: which pseudo label ('cam', 'par' or 'afa')
    supervises the seg branch, and which one L_aff's affinity labels are made from."""
    # The seg target (paper Table 3): the CAM label throughout for --seg-label cam (the baseline
    # never sees PAR); otherwise the PAR label up to the switch, the --seg-label one after it.
    # L_aff learns from the PAR label (the AFA label after the switch with --aff-from-afa); at
    # --aff-weight 0 it stays in the graph with weight 0, on the seg target (no label made for it).
    switched = step > cfg.switch_iters
    seg_kind = cfg.seg_label if (switched or cfg.seg_label == "cam") else "par"
    aff_kind = ("afa" if (switched and cfg.aff_from_afa) else "par") if cfg.aff_weight else seg_kind
    return seg_kind, aff_kind


def update(optimizer: torch.optim.Optimizer, scaler, loss: torch.Tensor) -> None:
    """Backward and one AdamW step (through the fp16 loss scaler where there is one)."""
    optimizer.zero_grad(set_to_none=True)
    with record_function("backward"):
        (scaler.scale(loss) if scaler is not None else loss).backward()
    with record_function("optimizer"):
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()


# =============================================================================================
# Optimiser (paper §4.1): AdamW with the release's parameter groups, frozen encoder norms
# =============================================================================================
def freeze_encoder_norms(model: AFANet) -> None:
    """The paper's frozen normalisation layers: the encoder's norms get no gradient at all."""
    for p in model.param_groups()["encoder_norm"]:
        p.requires_grad_(False)


def build_optimizer(model: AFANet, cfg: Config) -> torch.optim.AdamW:
    """AdamW with the release's groups: encoder ×1, encoder norms at lr 0 when frozen, heads and
    decoder ×head_lr_mult. Changes nothing in the model (`freeze_encoder_norms` does that)."""
    groups = model.param_groups()
    norm_lr = 0.0 if cfg.freeze_norm else cfg.lr
    param_groups = [
        dict(params=groups["encoder"], lr=cfg.lr, weight_decay=cfg.weight_decay),
        dict(params=groups["encoder_norm"], lr=norm_lr, weight_decay=0.0),
        dict(params=groups["heads"], lr=cfg.lr * cfg.head_lr_mult, weight_decay=cfg.weight_decay),
        dict(params=groups["decoder"], lr=cfg.lr * cfg.head_lr_mult, weight_decay=cfg.weight_decay),
    ]
    for g in param_groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8)


def make_autocast(cfg: Config, device: torch.device):
    """bf16 autocast where the device computes in bf16 natively; on a GPU without it, fp16 with a
    GradScaler (the loss scaling fp16's narrow range needs)."""
    if not cfg.amp:
        return contextlib.nullcontext, None
    if device.type == "cuda" and not cuda_has_native_bf16(device):
        dtype, scaler = torch.float16, torch.amp.GradScaler("cuda")
    else:
        dtype, scaler = torch.bfloat16, None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether this GPU has bf16 arithmetic: NVIDIA compute capability 8.0 (Ampere) and later; AMD
    GPUs, as PyTorch says. `torch.cuda.is_bf16_supported()` alone is no test: by default it also
    counts the emulation older GPUs (V100, T4) run, slower than fp16."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability(device)[0] >= 8
