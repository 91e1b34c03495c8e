"""Train AFA end to end (paper §3, SPEC §2–6): one network, one step, pseudo labels made on the fly.

Every iteration runs the pipeline of the paper's Fig. 2:

    forward ─► multi-scale CAM ─► CAM label ─► PAR label ─► affinity labels ─► L_aff
                      │                                                          │
                      └► random walk with the learned affinity (two thresholds)  │
                           ─► PAR ─► AFA pseudo label ─► L_seg ◄─────────────────┘ + L_cls

    python train.py                                   # built-in synthetic data, CPU, minutes
    python train.py --data VOC2012 --data-root data/VOCdevkit/VOC2012 --pretrained mit_b1.pth
    torchrun --nproc_per_node 2 train.py --data VOC2012 ...          # the paper's 2 GPUs × 2

The `Config` dataclass holds the paper's numbers (VOC 2012); `PRESETS` changes what a data set
needs (`synthetic` trains from scratch on a CPU, `COCO` follows the release's COCO script); any
command-line flag overrides both. Importing this module starts nothing.

The authors' release differs from the paper: it leaves out the dense-CRF loss L_reg (SPEC §6) —
so do we.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import data
from attention_affinity import affinity_labels, affinity_loss, window_mask
from cam import cam_to_label, multi_scale_cam, refine_cams_with_par, refine_propagated_with_par
from model import AFANet, load_mit_weights
from par import PAR
from random_walk import propagate


class ConfigError(Exception):
    """A mistake the user can fix (flag, file, folder): printed as one line, exit code 2."""


# =============================================================================================
# Configuration: one dataclass, the paper's numbers; presets; flags generated from the fields
# =============================================================================================
def opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- data -----------------------------------------------------------------------------------
    data: str = opt("synthetic", "data set and preset: synthetic | VOC2012 | COCO")
    data_root: str = opt("data/VOCdevkit/VOC2012", "folder of the data set (VOC layout)")
    train_split: str = opt("train_aug", "split list used for training")
    val_split: str = opt("val", "split list used for validation")
    num_classes: int = opt(21, "classes including background (VOC 21, COCO 81)")
    crop: int = opt(512, "training crop size (the release's launch script uses 512)")
    rescale: tuple = opt((0.5, 2.0), "random rescale range of the training images")
    # --- network --------------------------------------------------------------------------------
    backbone: str = opt("mit_b1", "encoder: mit_b1 (paper) or mit_b0")
    pretrained: str = opt("", "SegFormer ImageNet-1k weights for the encoder (mit_b1.pth)")
    # --- optimisation (SPEC §6) -----------------------------------------------------------------
    iters: int = opt(20000, "training iterations")
    batch_size: int = opt(4, "images per iteration over all processes (paper: 2 GPUs × 2)")
    lr: float = opt(6e-5, "learning rate of the encoder; heads and decoder get head_lr_mult×")
    head_lr_mult: float = opt(10.0, "learning-rate multiplier of classifier, AFA head and decoder")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    warmup_iters: int = opt(1500, "linear warm-up iterations")
    warmup_ratio: float = opt(1e-6, "learning-rate factor at the first warm-up step")
    poly_power: float = opt(1.0, "power of the polynomial decay after warm-up")
    freeze_norm: bool = opt(True, "keep the encoder's LayerNorms at their pretrained values")
    # --- the method's schedule (SPEC §6) --------------------------------------------------------
    cam_iters: int = opt(2000, "classification-only phase: L_seg and L_aff are off up to here")
    switch_iters: int = opt(6000, "the AFA pseudo label replaces the PAR label after this")
    aff_from_afa: bool = opt(False, "after the switch, affinity labels also from the AFA label (COCO)")
    seg_weight: float = opt(0.1, "weight of L_seg")
    aff_weight: float = opt(0.1, "weight of L_aff")
    # --- pseudo labels (SPEC §2–5) --------------------------------------------------------------
    cam_scales: tuple = opt((1.0, 0.5, 1.5), "scales of the multi-scale CAM")
    reuse_forward_cam: bool = opt(False, "multi-scale CAM reuses the forward's scale-1.0 CAMs "
                                         "(faster; changes the numbers: other drop-path draws)")
    cam_bf16: bool = opt(False, "multi-scale CAM alone under bf16 autocast (faster where bf16 is; "
                                "changes the numbers)")
    bkg_score: float = opt(0.45, "background threshold of the CAM label at evaluation")
    low: float = opt(0.35, "low background threshold during training")
    high: float = opt(0.55, "high background threshold during training")
    radius: int = opt(8, "radius of the affinity window on the stride-16 grid")
    par_iters: int = opt(10, "PAR iterations (COCO: 15)")
    # --- run ------------------------------------------------------------------------------------
    work_dir: str = opt("work_dirs/voc", "checkpoints, logs, metrics and figures go here")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    amp: bool = opt(False, "bf16 autocast (fp16 with loss scaling on GPUs without bf16)")
    compile: bool = opt(False, "torch.compile the encoder and decoder")
    resume: str = opt("", "checkpoint to resume from ('auto': the latest in work_dir)")
    eval_every: int = opt(2000, "validate and checkpoint every this many iterations")
    log_every: int = opt(20, "write a log line every this many iterations")
    keep_ckpts: int = opt(3, "how many periodic checkpoints to keep")
    workers: int = opt(4, "data-loading worker processes per training process")
    val_batch_size: int = opt(1, "validation batch size (1 when image sizes differ)")
    num_figures: int = opt(4, "val images drawn in figures/ at every validation")
    seed: int = opt(0, "seed of weights, data order and augmentation")
    debug: bool = opt(False, "show full tracebacks instead of one-line errors")


PRESETS = {
    # The paper's VOC 2012 run: the dataclass defaults.
    "VOC2012": {},
    # The release's COCO script: 4 GPUs × 2, 80k iterations, PAR 15 iterations, switch at 15k.
    "COCO": dict(data_root="data/coco", train_split="train", num_classes=81, iters=80000,
                 batch_size=8, cam_iters=5000, switch_iters=15000, aff_from_afa=True,
                 par_iters=15, eval_every=5000, work_dir="work_dirs/coco"),
    # Built-in data, trained from scratch on a CPU in minutes. What from-scratch training needs
    # differs from the paper (README, "The synthetic preset"): a larger learning rate, trainable
    # norms, milder rescaling, short phases, a stronger L_aff, a small encoder and crop.
    "synthetic": dict(data_root="data/synthetic", train_split="train", num_classes=6,
                      backbone="mit_b0", crop=128, rescale=(0.75, 1.5), batch_size=8,
                      iters=900, lr=1e-3, head_lr_mult=1.0, freeze_norm=False, warmup_iters=50,
                      cam_iters=300, switch_iters=600, aff_weight=1.0, eval_every=300,
                      log_every=10, workers=2, val_batch_size=16, work_dir="work_dirs/synthetic"),
}


def parse_config(argv=None) -> Config:
    """Config = dataclass defaults ← preset of --data ← the flags given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.type == "tuple":
            parser.add_argument(flag, type=float, nargs="+", help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            choices = list(PRESETS) if f.name == "data" else None
            parser.add_argument(flag, type=kind, choices=choices, help=help_text)
    given = vars(parser.parse_args(argv))
    preset = PRESETS[given.get("data", Config.data)]
    cfg = Config(**{**preset, **{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in given.items()}})
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Contradictory or impossible settings end here, before anything is built."""
    def fail(msg):
        raise ConfigError(msg)
    if cfg.backbone not in ("mit_b0", "mit_b1"):
        fail(f"--backbone {cfg.backbone}: choose mit_b0 or mit_b1")
    if cfg.iters < 1 or cfg.batch_size < 1 or cfg.eval_every < 1 or cfg.log_every < 1:
        fail("--iters, --batch-size, --eval-every and --log-every must be positive")
    if cfg.crop < 32 or cfg.crop % 16:
        fail(f"--crop {cfg.crop}: the crop must be a multiple of 16 (the encoder's stride), >= 32")
    if not 0 <= cfg.low <= cfg.high <= 1:
        fail(f"--low {cfg.low} / --high {cfg.high}: need 0 <= low <= high <= 1")
    if len(cfg.rescale) != 2 or not 0 < cfg.rescale[0] <= cfg.rescale[1]:
        fail(f"--rescale {cfg.rescale}: give two factors, 0 < min <= max")
    if not cfg.cam_scales or min(cfg.cam_scales) <= 0:
        fail(f"--cam-scales {cfg.cam_scales}: give positive scales")
    if cfg.cam_iters > cfg.switch_iters:
        fail(f"--cam-iters {cfg.cam_iters} > --switch-iters {cfg.switch_iters}: the AFA label "
             "cannot replace the PAR label before pseudo labels are used at all")
    if cfg.num_classes < 2:
        fail("--num-classes counts background too: it must be at least 2")


# =============================================================================================
# Schedule (SPEC §6): linear warm-up, then polynomial decay — a pure function of the step
# =============================================================================================
def lr_factor(step: int, warmup_iters: int, total_iters: int, warmup_ratio: float = 1e-6,
              power: float = 1.0) -> float:
    if step < warmup_iters:
        return 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
    return max(0.0, 1 - step / total_iters) ** power


def build_optimizer(model: AFANet, cfg: Config) -> torch.optim.AdamW:
    """AdamW with the release's groups: encoder ×1, encoder norms frozen (lr 0), heads ×10."""
    groups = model.param_groups()
    if cfg.freeze_norm:
        for p in groups["encoder_norm"]:
            p.requires_grad_(False)
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


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: Config) -> None:
    factor = lr_factor(step, cfg.warmup_iters, cfg.iters, cfg.warmup_ratio, cfg.poly_power)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor


# =============================================================================================
# Losses
# =============================================================================================
def seg_loss(seg_logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Balanced cross entropy of SPEC §6: ½ (CE over background pixels + CE over foreground ones).

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


# =============================================================================================
# The step, one function per stage of the paper
# =============================================================================================
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, H, W) back to RGB in [0, 1], the input PAR sees in the release."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean) / 255.0


def token_grid(size: int, stride: int = 16) -> int:
    """Side of the stride-16 token grid for an input side `size` (each patch embedding pads)."""
    return -(-size // stride)


class PseudoLabels(NamedTuple):
    cam: torch.Tensor            # (B, H, W) three-band CAM label (SPEC §2)
    par: torch.Tensor            # (B, H, W) CAM label refined with PAR (SPEC §3)
    afa: torch.Tensor | None     # (B, H, W) AFA pseudo label (SPEC §5); None when not needed


def random_walk_cams(cams: torch.Tensor, affinity: torch.Tensor, cls_labels: torch.Tensor,
                     scale: float, bkg_score: float, radius: int) -> torch.Tensor:
    """Propagate the label-masked CAMs with the learned affinity (SPEC §5), back at the image size.

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
    return F.interpolate(walked, size=(H, W), mode="bilinear", align_corners=False)


def afa_pseudo_label(par: PAR, pixels: torch.Tensor, cams: torch.Tensor, affinity: torch.Tensor,
                     cls_labels: torch.Tensor, valid_box: torch.Tensor, scale: float,
                     low: float, high: float, radius: int) -> torch.Tensor:
    """The AFA pseudo label (SPEC §5): random walk at both thresholds, PAR in the valid box.

    pixels (B, 3, H, W) in [0, 1]; cams (B, C-1, H, W); affinity (B, N, N) at `scale`.
    """
    walked_low, walked_high = (random_walk_cams(cams, affinity, cls_labels, scale, t, radius)
                               for t in (low, high))                       # (B, C, H, W) each
    return refine_propagated_with_par(par, pixels, walked_low, walked_high, cls_labels, valid_box)


def make_pseudo_labels(model: AFANet, par: PAR, images: torch.Tensor, cls_labels: torch.Tensor,
                       valid_box: torch.Tensor, cfg: Config, need_afa: bool,
                       forward_cams: torch.Tensor | None = None) -> PseudoLabels:
    """Stages 1–3 of the step, without gradient: CAM → PAR label (→ AFA label).

    forward_cams: the forward's CAMs (B, C-1, h, w), reused at scale 1.0 when given."""
    # bf16 for the multi-scale CAM alone, when asked: the forward and the losses keep theirs
    cam_precision = (torch.autocast(images.device.type, dtype=torch.bfloat16) if cfg.cam_bf16
                     else contextlib.nullcontext())
    with torch.no_grad():
        # --- Stage 1: multi-scale CAM, affinity at the largest scale (SPEC §2) -------------------
        with cam_precision:
            cams, affinity = multi_scale_cam(model, images, cfg.cam_scales,
                                             forward_cams=forward_cams)  # (B, C-1, H, W), (B, N, N)
        cams, affinity = cams.float(), affinity.float()
        cam_label = cam_to_label(cams, cls_labels, low=cfg.low, high=cfg.high, valid_box=valid_box)
        # --- Stage 2: refine the CAM label with PAR (SPEC §3) -----------------------------------
        pixels = denormalize(images.float())
        par_label = refine_cams_with_par(par, pixels, cams, cls_labels, low=cfg.low,
                                         high=cfg.high, valid_box=valid_box)
        # --- Stage 3: random walk with the learned affinity, refined with PAR (SPEC §5) --------
        afa_label = None
        if need_afa:
            afa_label = afa_pseudo_label(par, pixels, cams, affinity, cls_labels, valid_box,
                                         max(cfg.cam_scales), cfg.low, cfg.high, cfg.radius)
    return PseudoLabels(cam_label, par_label, afa_label)


class StepOutput(NamedTuple):
    loss: torch.Tensor           # the total loss, with graph
    terms: dict                  # detached loss terms by name
    labels: PseudoLabels | None


def compute_losses(net, model: AFANet, par: PAR, batch: dict, step: int, cfg: Config,
                   autocast) -> StepOutput:
    """Forward, pseudo labels and losses of one step (SPEC §6). `net` may be the DDP wrapper."""
    images, cls_labels, valid_box = batch["image"], batch["cls_labels"], batch["valid_box"]
    with autocast():
        out = net(images)
    # --- L_cls: multilabel soft margin on the globally max-pooled logits --------------------------
    cls_loss = F.multilabel_soft_margin_loss(out.cls_logits.float(), cls_labels)
    if step <= cfg.cam_iters:
        # Classification only. The zero-weighted terms keep every parameter in the graph (so DDP
        # needs no unused-parameter search) and give the release's zero gradients to the heads.
        zero = 0.0 * (out.seg_logits.float().sum() + out.affinity.float().sum())
        return StepOutput(cls_loss + zero, {"cls": cls_loss.detach()}, None)

    switched = step > cfg.switch_iters
    forward_cams = out.cams.detach() if cfg.reuse_forward_cam else None
    with autocast():
        labels = make_pseudo_labels(model, par, images, cls_labels, valid_box, cfg,
                                    need_afa=switched, forward_cams=forward_cams)
    seg_target = labels.afa if switched else labels.par
    aff_source = labels.afa if (switched and cfg.aff_from_afa) else labels.par
    # --- Stage 4: affinity labels from the pseudo label, L_aff (SPEC §4) --------------------------
    h, w = token_grid(images.shape[-2]), token_grid(images.shape[-1])
    mask = window_mask(h, w, cfg.radius, device=images.device)                 # (N, N)
    aff_target = affinity_labels(aff_source, grid=(h, w), mask=mask)           # (B, N, N)
    aff_loss = affinity_loss(out.affinity.float(), aff_target)
    # --- L_seg: balanced cross entropy on the seg logits upsampled to the crop -------------------
    seg_logits = F.interpolate(out.seg_logits.float(), size=images.shape[-2:], mode="bilinear",
                               align_corners=False)                            # (B, C, H, W)
    seg = seg_loss(seg_logits, seg_target)
    loss = cls_loss + cfg.seg_weight * seg + cfg.aff_weight * aff_loss
    terms = {"cls": cls_loss.detach(), "seg": seg.detach(), "aff": aff_loss.detach()}
    return StepOutput(loss, terms, labels)


# =============================================================================================
# Data: the training set as a seeded stream, so that a resumed run sees the same batches
# =============================================================================================
class TrainStream(Dataset):
    """Item k of an endless stream of augmented training samples, a pure function of (seed, k).

    Epoch e = k // n visits the dataset in the order randperm(n, seed + e); the augmentation of
    item k draws from a generator seeded with (seed, k). Neither depends on worker processes or on
    where a run was resumed.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._order = (None, None)  # (epoch, permutation) of the last epoch asked for

    def __len__(self):
        return sys.maxsize

    def __getitem__(self, k: int):
        n = len(self.dataset)
        epoch, position = divmod(k, n)
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(n, generator=g))
        index = int(self._order[1][position])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 2_000_003 + k) % (2 ** 63))
            random.seed(k)
            return self.dataset[index]


class StepSampler(Sampler):
    """The stream positions this process reads for steps [start, end): its share of each batch."""

    def __init__(self, start: int, end: int, batch_size: int, rank: int, world: int):
        self.start, self.end, self.batch_size = start, end, batch_size
        self.per_rank, self.rank = batch_size // world, rank

    def __iter__(self):
        for step in range(self.start, self.end):
            first = step * self.batch_size + self.rank * self.per_rank
            yield from range(first, first + self.per_rank)

    def __len__(self):
        return (self.end - self.start) * self.per_rank


def shard_loader(dataset: Dataset, batch_size: int, rank: int, world: int, workers: int):
    """This process's share of an evaluation set: items rank, rank + world, … (no repeats)."""
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                      generator=torch.Generator())


def build_datasets(cfg: Config):
    cache_dir = os.path.join(cfg.work_dir, "cache")
    if cfg.data == "synthetic" and not os.path.isdir(cfg.data_root):
        data.make_synthetic(cfg.data_root)  # seconds, once; a set made with other sizes is kept
    common = dict(num_classes=cfg.num_classes, cache_dir=cache_dir)
    train_set = data.build_dataset(cfg.data, cfg.data_root, cfg.train_split, train=True,
                                   crop_size=cfg.crop, rescale_range=tuple(cfg.rescale), **common)
    val_set = data.build_dataset(cfg.data, cfg.data_root, cfg.val_split, train=False, **common)
    return train_set, val_set


# =============================================================================================
# Checkpoints: atomic writes, the last K kept, everything needed to resume exactly
# =============================================================================================
def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def rng_state() -> dict:
    """Every RNG the step draws on, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by this script, with one clear message for each failure."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} does not exist; pass the path of a .pth written by "
                          "train.py (work_dir/checkpoints/), or --resume auto")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is corrupt, "
                          "truncated or not a PyTorch file — use an earlier checkpoint") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ConfigError(f"checkpoint {path} was not written by train.py (no 'model'/'config' "
                          "entries); for SegFormer ImageNet weights use --pretrained instead")
    return ckpt


def check_compatible(ckpt: dict, cfg: Config, path: str) -> None:
    saved = ckpt["config"]
    for key in ("backbone", "num_classes"):
        if saved.get(key) != getattr(cfg, key):
            raise ConfigError(f"checkpoint {path} was made with {key}={saved.get(key)} but this "
                              f"run has {key}={getattr(cfg, key)}; pass --{key.replace('_', '-')} "
                              f"{saved.get(key)} or use a matching checkpoint")


def latest_checkpoint(work_dir: str) -> str | None:
    folder = os.path.join(work_dir, "checkpoints")
    if not os.path.isdir(folder):
        return None
    names = [n for n in os.listdir(folder) if n.startswith("iter_") and n.endswith(".pth")]
    if not names:
        return None
    return os.path.join(folder, max(names, key=lambda n: int(n[5:-4])))


# =============================================================================================
# Distributed set-up (torchrun): gloo on CPU, nccl on GPU
# =============================================================================================
def setup_distributed(cfg: Config):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: no CUDA device here; use --device cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if world > 1:
        if cfg.batch_size % world:
            raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {world} "
                              "processes; use a multiple of the process count")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def make_autocast(cfg: Config, device: torch.device):
    """bf16 autocast where the device supports it; otherwise fp16 (with a GradScaler)."""
    if not cfg.amp:
        return contextlib.nullcontext, None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtype, scaler = torch.float16, torch.amp.GradScaler("cuda")
    else:
        dtype, scaler = torch.bfloat16, None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


# =============================================================================================
# Training
# =============================================================================================
def check_work_dir(work_dir: str) -> None:
    try:
        os.makedirs(os.path.join(work_dir, "checkpoints"), exist_ok=True)
        probe = os.path.join(work_dir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"work dir {work_dir} is not writable ({e.strerror}); pass "
                          "--work-dir with a folder you can write to") from e


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


class TrainResult(NamedTuple):
    model: AFANet                # the trained network (unwrapped)
    metrics: dict                # the last validation scores


def train(cfg: Config) -> TrainResult:
    """Run the whole training (or its remainder, when resuming)."""
    rank, world, device = setup_distributed(cfg)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    if is_main:
        check_work_dir(cfg.work_dir)
    if world > 1:
        dist.barrier()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    log("config:\n" + "\n".join(f"  {k} = {v}" for k, v in dataclasses.asdict(cfg).items()))
    if is_main:
        with open(os.path.join(cfg.work_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    # --- data ------------------------------------------------------------------------------------
    if is_main or cfg.data != "synthetic":
        train_set, val_set = build_datasets(cfg)
    if world > 1:
        dist.barrier()                       # rank 0 generated the synthetic data / label caches
        if not is_main:
            train_set, val_set = build_datasets(cfg)

    # --- model, refiner, optimiser ---------------------------------------------------------------
    model = AFANet(cfg.num_classes, backbone=cfg.backbone)
    if cfg.pretrained and not cfg.resume:
        try:
            load_mit_weights(model.encoder, cfg.pretrained)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"--pretrained: {e}") from e
        log(f"encoder initialised from {cfg.pretrained}")
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    par = PAR(num_iter=cfg.par_iters).to(device)
    optimizer = build_optimizer(model, cfg)
    autocast, scaler = make_autocast(cfg, device)

    start_step, history = 0, []
    resume = latest_checkpoint(cfg.work_dir) if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto" and resume is None:
        log(f"--resume auto: no checkpoint in {cfg.work_dir}/checkpoints, starting afresh")
    if resume:
        ckpt = load_checkpoint(resume)
        check_compatible(ckpt, cfg, resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_step, history = ckpt["step"], ckpt.get("history", [])
        set_rng_state(ckpt["rng"])
        log(f"resumed from {resume} at iteration {start_step}")
    if start_step >= cfg.iters:
        log(f"nothing to do: the checkpoint is at iteration {start_step} of {cfg.iters}")

    if cfg.compile:
        # One graph per input shape: the multi-scale CAM feeds the encoder 3 more shapes than the
        # training forward, and with dynamic shapes inductor fails on the encoder (torch 2.13).
        model.encoder.compile(dynamic=False)
        model.decoder.compile(dynamic=False)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # A dedicated generator keeps the DataLoader from drawing on the global RNG (exact resume).
    loader = DataLoader(TrainStream(train_set, cfg.seed), batch_size=cfg.batch_size // world,
                        sampler=StepSampler(start_step, cfg.iters, cfg.batch_size, rank, world),
                        num_workers=cfg.workers, generator=torch.Generator(),
                        persistent_workers=False, drop_last=False)
    val_loader = shard_loader(val_set, cfg.val_batch_size, rank, world, cfg.workers)

    def checkpoint_state(step):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "config": dataclasses.asdict(cfg), "rng": rng_state(), "history": history,
                "scaler": scaler.state_dict() if scaler is not None else None}

    def save(step, name=None):
        if not is_main:
            return None
        folder = os.path.join(cfg.work_dir, "checkpoints")
        path = os.path.join(folder, name or f"iter_{step}.pth")
        save_checkpoint(path, checkpoint_state(step))
        periodic = sorted((n for n in os.listdir(folder) if n.startswith("iter_") and n.endswith(".pth")),
                          key=lambda n: int(n[5:-4]))
        for old in periodic[:-cfg.keep_ckpts]:
            os.remove(os.path.join(folder, old))
        return path

    log_path = os.path.join(cfg.work_dir, "log.jsonl")
    model.train()
    bar = tqdm(total=cfg.iters, initial=start_step, disable=not is_main, dynamic_ncols=True,
               desc="train")
    running, t_start = {}, time.time()
    metrics = history[-1] if history else {}
    previous_sigint = signal.getsignal(signal.SIGINT)
    stop = install_interrupt_handler()
    try:
        for step, batch in zip(range(start_step, cfg.iters), loader):
            batch = to_device(batch, device)
            set_lr(optimizer, step, cfg)
            # The forward updates the norms' running statistics; keep them (a few hundred
            # numbers) so that a non-finite step can be undone before its checkpoint is saved.
            buffers = [b.clone() for b in model.buffers()]
            out = compute_losses(net, model, par, batch, step, cfg, autocast)
            # One host sync per step: the loss values, for the log and the finiteness check.
            values = dict(zip(out.terms, torch.stack(list(out.terms.values())).tolist()))
            if not all(math.isfinite(v) for v in values.values()):
                with torch.no_grad():
                    for b, kept in zip(model.buffers(), buffers):
                        b.copy_(kept)
                path = save(step, name=f"nonfinite_iter_{step}.pth")
                raise FloatingPointError(
                    f"non-finite loss at iteration {step}: {values}. The weights before this step "
                    f"are saved in {path}; lower --lr or try without --amp, then --resume it.")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(out.loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                out.loss.backward()
                optimizer.step()

            for k, v in values.items():
                running[k] = running.get(k, 0.0) + v
            running["n"] = running.get("n", 0) + 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.iters:
                means = {k: v / running["n"] for k, v in running.items() if k != "n"}
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
                if is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": done, "lr": optimizer.param_groups[0]["lr"],
                                            **means, "time": time.time() - t_start}) + "\n")
                running = {}
            bar.update(1)

            if done % cfg.eval_every == 0 or done == cfg.iters:
                metrics = run_validation(model, par, val_loader, val_set, cfg, done, device, world)
                history.append(metrics)
                if is_main:
                    write_metrics(cfg.work_dir, history)
                    tqdm.write(format_metrics(metrics))
                save(done)
                model.train()
            if stop.is_set():
                path = save(done, name=f"interrupted_iter_{done}.pth")
                bar.close()
                log(f"\ninterrupted after iteration {done}; saved {path}; continue with "
                    f"--resume {path}")
                raise SystemExit(130)
    finally:  # also on an error: the bar ends before the message, Ctrl-C is the caller's again
        bar.close()
        if previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous_sigint)
    if is_main and history:
        print(metrics_table(history))
        print(f"done in {time.time() - t_start:.0f} s; checkpoints in {cfg.work_dir}/checkpoints")
    if world > 1:
        dist.destroy_process_group()
    return TrainResult(model, metrics)


def run_validation(model, par, val_loader, val_set, cfg: Config, step: int, device, world):
    import evaluate  # evaluate.py builds on this module's stages, so it is imported here
    model.eval()
    scores = evaluate.validate(model, val_loader, cfg.num_classes, device=device, world=world,
                               scales=cfg.cam_scales, bkg_score=cfg.bkg_score, low=cfg.low,
                               radius=cfg.radius)
    if int(os.environ.get("RANK", "0")) == 0 and cfg.num_figures > 0:
        evaluate.training_figure(model, par, val_set, range(min(cfg.num_figures, len(val_set))),
                                 os.path.join(cfg.work_dir, "figures", f"val_iter_{step}.png"),
                                 device=device, scales=cfg.cam_scales, bkg_score=cfg.bkg_score,
                                 low=cfg.low, high=cfg.high, radius=cfg.radius)
    return {"step": step, **scores}


def write_metrics(work_dir: str, history: list) -> None:
    """metrics.json: the latest validation at the top level, every validation under 'history'."""
    path = os.path.join(work_dir, "metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**history[-1], "history": history}, f, indent=2)
    os.replace(tmp, path)


METRIC_COLUMNS = (("cls_f1", "cls F1"), ("cam_miou", "CAM mIoU"), ("afa_miou", "AFA mIoU"),
                  ("seg_miou", "seg mIoU"))


def format_metrics(m: dict) -> str:
    return f"iter {m['step']}: " + ", ".join(f"{name} {m[k]:.3f}" for k, name in METRIC_COLUMNS)


def metrics_table(history: list) -> str:
    header = "| iteration | " + " | ".join(name for _, name in METRIC_COLUMNS) + " |"
    rule = "|---" * (len(METRIC_COLUMNS) + 1) + "|"
    rows = [f"| {m['step']} | " + " | ".join(f"{m[k]:.3f}" for k, _ in METRIC_COLUMNS) + " |"
            for m in history]
    return "\n".join(["validation:", header, rule, *rows])


def install_interrupt_handler() -> threading.Event:
    """First Ctrl-C: finish the current step, save a checkpoint, exit. Second: stop at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return stop

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        tqdm.write("Ctrl-C: saving a checkpoint after this iteration (press again to abort)")

    signal.signal(signal.SIGINT, handler)
    return stop


def one_line(error: Exception) -> str:
    """The message of a user error; one raised in a DataLoader worker arrives wrapped in the
    worker's traceback, whose last line is the original message."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def main(argv=None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cfg = parse_config(argv)
        train(cfg)
    except (ConfigError, data.DatasetError, FloatingPointError) as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
