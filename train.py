"""Train AFA end to end (paper §3, §4.1): one network, one step, pseudo labels made on the fly.

Every iteration runs the pipeline of the paper's Fig. 2 (`compute_losses`; the stages are in
pipeline.py):

    forward ─► multi-scale CAM ─► CAM label ─► PAR label ─► affinity labels ─► L_aff
                      │                                                          │
                      └► random walk with the learned affinity (two thresholds)  │
                           ─► PAR ─► AFA pseudo label ─► L_seg ◄─────────────────┘ + L_cls

    python train.py                                   # built-in synthetic data, CPU, minutes
    python train.py --data VOC2012 --data-root data/VOCdevkit/VOC2012 --pretrained mit_b1.pth
    torchrun --nproc_per_node 2 train.py --data VOC2012 ...          # the paper's 2 GPUs × 2
    python train.py --resume auto                     # continue the run in --work-dir

The `Config` dataclass holds the paper's numbers (VOC 2012); `PRESETS` changes what a data set
needs (`synthetic` trains from scratch on a CPU, `COCO` follows the release's COCO script); any
command-line flag overrides both. Importing this module starts nothing; the step's stages
(`seg_loss`, `make_pseudo_labels`, ...) are importable from here as from pipeline.py.

The authors' final release differs from the paper: it leaves out the dense-CRF loss L_reg
(paper §3.4), whose C++ filter would not build for users; here it is on (`--reg-weight 0.01`, the
paper's full system, in plain PyTorch: crf_loss.py), and `--reg-weight 0` is that release. The
switches `--seg-label`, `--aff-weight 0` and `--propagate-with` rerun the rows of the paper's
ablation tables (ablation.py runs them all). As in the release, the CAM passes run in train mode
on every iteration, the classification-only phase included, and update the decoder's BatchNorm
statistics (`--no-cam-bn-stats` skips that: faster, other eval-mode numbers).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import data
import synthetic
from attention_affinity import affinity_loss
from metrics import format_metrics, metrics_table, validate
from model import BACKBONES, AFANet
from par import PAR
from pipeline import (LabelSettings, PseudoLabels, affinity_targets, afa_pseudo_label,  # noqa: F401
                      cam_statistics_passes, denormalize, label_precision, make_pseudo_labels,
                      random_walk_cams, reg_loss, seg_loss, token_grid, upsample)
from pretrained import load_pretrained
from visualize import class_names_of, training_figure


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
    backbone: str = opt("mit_b1", "encoder: mit_b1 (paper), mit_b0, or a plain ViT: vit_s16, "
                                  "vit_b16 (vit_tiny16 for tests)")
    pretrained: str = opt("", "ImageNet weights for the encoder: SegFormer's mit_b1.pth, a Hugging "
                              "Face nvidia/mit-b* file, timm/DeiT ViT weights (README)")
    # --- optimisation (paper §4.1) --------------------------------------------------------------
    iters: int = opt(20000, "training iterations")
    batch_size: int = opt(4, "images per iteration over all processes (paper: 2 GPUs × 2)")
    lr: float = opt(6e-5, "learning rate of the encoder; heads and decoder get head_lr_mult×")
    head_lr_mult: float = opt(10.0, "learning-rate multiplier of classifier, AFA head and decoder")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    warmup_iters: int = opt(1500, "linear warm-up iterations")
    warmup_ratio: float = opt(1e-6, "learning-rate factor at the first warm-up step")
    poly_power: float = opt(1.0, "power of the polynomial decay after warm-up")
    freeze_norm: bool = opt(True, "keep the encoder's LayerNorms at their pretrained values")
    # --- the method's schedule (paper §3.4, §4.1) -----------------------------------------------
    cam_iters: int = opt(2000, "classification-only phase: L_seg and L_aff are off up to here")
    switch_iters: int = opt(6000, "the AFA pseudo label replaces the PAR label after this")
    aff_from_afa: bool = opt(False, "after the switch, affinity labels also from the AFA label (COCO)")
    seg_weight: float = opt(0.1, "weight of L_seg")
    aff_weight: float = opt(0.1, "weight of L_aff; 0 leaves the AFA head untrained (paper Table 3's "
                                 "rows baseline and +PAR, Table 4's 'w/o AFA')")
    reg_weight: float = opt(0.01, "weight of L_reg, the dense-CRF energy loss on the seg branch, on "
                                  "after cam_iters (paper §3.4, Table 3's '+L_reg'); 0 = the "
                                  "authors' final VOC release, which dropped L_reg, and their "
                                  "COCO script, which never ran it")
    seg_label: str = opt("afa", "what supervises the seg branch after the switch: cam (the "
                                "three-band CAM label, also before the switch: Table 3's "
                                "'baseline'), par (the PAR label: Table 3's '+PAR'), afa (the AFA "
                                "pseudo label: Table 3's '+AFA')")
    propagate_with: str = opt("affinity", "the random walk's pairwise scores: affinity (the "
                                          "learned affinity) or attention (the raw MHSA maps of "
                                          "the same blocks, averaged over heads and blocks, made "
                                          "symmetric: Table 4's 'AFA (prop. with MHSA)')")
    # --- pseudo labels (paper §3.1–3.3) ---------------------------------------------------------
    cam_scales: tuple = opt((1.0, 0.5, 1.5), "scales of the multi-scale CAM")
    cam_bn_stats: bool = opt(True, "the CAM passes update the decoder's BatchNorm statistics on "
                                   "every iteration, as in the release (off: faster, other numbers)")
    reuse_forward_cam: bool = opt(False, "multi-scale CAM reuses the forward's scale-1.0 CAMs "
                                         "(faster; changes the numbers: other drop-path draws)")
    cam_bf16: bool = opt(False, "multi-scale CAM alone under bf16 autocast (faster only where the "
                                "hardware has bf16: GPUs, CPUs with AVX512-BF16 or AMX; changes "
                                "the numbers)")
    bkg_score: float = opt(0.45, "background threshold of the CAM label at evaluation")
    low: float = opt(0.35, "low background threshold during training")
    high: float = opt(0.55, "high background threshold during training")
    radius: int = opt(8, "radius of the affinity window on the stride-16 grid")
    par_iters: int = opt(10, "PAR iterations (COCO: 15)")
    # --- run ------------------------------------------------------------------------------------
    work_dir: str = opt("work_dirs/voc", "checkpoints, logs, metrics and figures go here")
    overwrite: bool = opt(False, "start a new run in a work dir that holds one, deleting its files")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    amp: bool = opt(False, "bf16 autocast of the network (fp16 with loss scaling on GPUs without "
                           "bf16); the pseudo labels stay fp32. On a CPU only with bf16 "
                           "instructions (AVX512-BF16, AMX): elsewhere it is emulated and slower")
    compile: bool = opt(False, "torch.compile the encoder and decoder")
    resume: str = opt("", "checkpoint to resume from ('auto': the newest in work_dir)")
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
    # The release's COCO script: 4 GPUs × 2, 80k iterations, PAR 15 iterations, switch at 15k,
    # affinity labels from the AFA label after it. It never turned L_reg on (its call and its
    # 0.01 term are commented out), so neither does this preset: --reg-weight 0.01 adds it.
    "COCO": dict(data_root="data/coco", train_split="train", num_classes=81, iters=80000,
                 batch_size=8, cam_iters=5000, switch_iters=15000, aff_from_afa=True,
                 reg_weight=0.0, par_iters=15, eval_every=5000, work_dir="work_dirs/coco"),
    # Built-in data, trained from scratch on a CPU in minutes. What from-scratch training needs
    # differs from the paper (README, "The synthetic preset"): a larger learning rate, trainable
    # norms, milder rescaling, short phases, a stronger L_aff, a small encoder and crop. The CAM
    # passes leave the decoder's BatchNorm statistics alone (cam_bn_stats): in the 300
    # classification-only iterations they would more than triple the step (1.1 s, measured with
    # other jobs running, against 0.30 s per iteration on 2 cores) and push the run past 10
    # minutes; only eval-mode seg numbers depend on them. CAM scales, thresholds and PAR stay
    # the paper's: without the 0.5 scale (a 4 × 4 grid at crop 128) every label improves (val
    # CAM 57 → 72, seg 80 → 94) but PAR and AFA are left almost nothing to fix, and the demo would
    # no longer show them (docs/demo_study.md).
    "synthetic": dict(data_root="data/synthetic", train_split="train", num_classes=6,
                      backbone="mit_b0", crop=128, rescale=(0.75, 1.5), batch_size=8,
                      iters=900, lr=1e-3, head_lr_mult=1.0, freeze_norm=False, warmup_iters=50,
                      cam_iters=300, switch_iters=600, aff_weight=1.0, cam_bn_stats=False,
                      eval_every=300,
                      log_every=10, workers=2, val_batch_size=16, work_dir="work_dirs/synthetic"),
}
HELP_PRESETS = ("synthetic", "VOC2012", "COCO")  # the order in which --help lists the defaults


def preset_defaults(name: str) -> str:
    """A flag's default in each preset: "512", or "synthetic 128; VOC2012, COCO 512"."""
    default = next(f.default for f in dataclasses.fields(Config) if f.name == name)
    groups = []                                 # [value, [presets]] in HELP_PRESETS order
    for preset in HELP_PRESETS:
        value = PRESETS[preset].get(name, default)
        same = [group for group in groups if group[0] == value]
        if same:
            same[0][1].append(preset)
        else:
            groups.append([value, [preset]])
    if len(groups) == 1:
        return str(default)
    return "; ".join(f"{', '.join(presets)} {value}" for value, presets in groups)


def parse_config(argv=None) -> Config:
    """Config = dataclass defaults ← preset of --data ← the flags given on the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] + "\n\nThe defaults depend on the preset chosen with "
        "--data (synthetic when --data is not given);\nwhere the presets differ, each flag lists "
        "its default per preset.", formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {preset_defaults(f.name)})".replace("%", "%%")
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
    if cfg.backbone not in BACKBONES:
        fail(f"--backbone {cfg.backbone}: choose one of {', '.join(BACKBONES)}")
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
    if cfg.seg_label not in ("cam", "par", "afa"):
        fail(f"--seg-label {cfg.seg_label}: choose cam, par or afa")
    if cfg.propagate_with not in ("affinity", "attention"):
        fail(f"--propagate-with {cfg.propagate_with}: choose affinity or attention")
    if cfg.reg_weight < 0:
        fail(f"--reg-weight {cfg.reg_weight}: give a weight >= 0 (0 turns L_reg off)")
    if cfg.aff_weight == 0 and cfg.seg_label == "afa" and cfg.propagate_with == "affinity":
        fail("--seg-label afa needs the learned affinity, which --aff-weight 0 leaves untrained; "
             "pass --seg-label par (or cam), or a positive --aff-weight")
    if cfg.aff_weight == 0 and cfg.aff_from_afa:
        fail("--aff-from-afa takes affinity labels for L_aff, which --aff-weight 0 turns off; "
             "drop --aff-from-afa or pass a positive --aff-weight")
    if cfg.num_classes < 2:
        fail("--num-classes counts background too: it must be at least 2")


# =============================================================================================
# Schedule and optimiser (paper §4.1): warm-up then polynomial decay, the release's groups
# =============================================================================================
def lr_factor(step: int, warmup_iters: int, total_iters: int, warmup_ratio: float = 1e-6,
              power: float = 1.0) -> float:
    if step < warmup_iters:
        return 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
    return max(0.0, 1 - step / total_iters) ** power


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


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: Config) -> None:
    factor = lr_factor(step, cfg.warmup_iters, cfg.iters, cfg.warmup_ratio, cfg.poly_power)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor


# =============================================================================================
# The step (paper Fig. 2): forward, pseudo labels, losses
# =============================================================================================
class StepOutput(NamedTuple):
    loss: torch.Tensor           # the total loss, with graph
    terms: dict                  # detached loss terms by name
    labels: PseudoLabels | None  # the step's pseudo labels; None in the classification-only phase


def compute_losses(net, model: AFANet, par: PAR, batch: dict, step: int, cfg: Config,
                   autocast) -> StepOutput:
    """Forward, pseudo labels and losses of one step (paper §3.4). `net` may be the DDP wrapper
    of `model`; `autocast` covers the forward alone: the pseudo labels stay float32."""
    images, cls_labels, valid_box = batch["image"], batch["cls_labels"], batch["valid_box"]
    # --- forward: classification, segmentation and affinity from one pass (paper §3.1) ---------
    with autocast():
        out = net(images)
    # --- L_cls: multilabel soft margin on the globally max-pooled logits -----------------------
    cls_loss = F.multilabel_soft_margin_loss(out.cls_logits.float(), cls_labels)
    if step <= cfg.cam_iters:
        if cfg.cam_bn_stats:  # as the release: the CAM passes run, for the BatchNorm statistics
            cam_statistics_passes(model, images, cfg.cam_scales, cfg.cam_bf16)
        # Classification only. The zero-weighted terms keep every parameter in the graph (so DDP
        # needs no unused-parameter search) and give the release's zero gradients to the heads.
        zero = 0.0 * (out.seg_logits.float().sum() + out.affinity.float().sum())
        return StepOutput(cls_loss + zero, {"cls": cls_loss.detach()}, None)
    # --- stages 1–3: CAM → PAR label (→ random walk → AFA label), no gradient, float32 ---------
    # The seg target (paper Table 3): the CAM label throughout for --seg-label cam (the baseline
    # never sees PAR); otherwise the PAR label up to the switch, the --seg-label one after it.
    # L_aff learns from the PAR label (the AFA label after the switch with --aff-from-afa); at
    # --aff-weight 0 it stays in the graph with weight 0, on the seg target (no label made for it).
    switched = step > cfg.switch_iters
    seg_kind = cfg.seg_label if (switched or cfg.seg_label == "cam") else "par"
    aff_kind = ("afa" if (switched and cfg.aff_from_afa) else "par") if cfg.aff_weight else seg_kind
    labels = make_pseudo_labels(
        model, par, images, cls_labels, valid_box, LabelSettings.from_config(cfg),
        need={seg_kind, aff_kind}, thresholds="train", affinity_from="cam_pass",
        cam_bf16=cfg.cam_bf16, decoder_stats=cfg.cam_bn_stats,
        forward_cams=out.cams.detach() if cfg.reuse_forward_cam else None)
    seg_target, aff_source = getattr(labels, seg_kind), getattr(labels, aff_kind)  # (B, H, W) each
    # --- stage 4: affinity labels from the pseudo label, L_aff (paper §3.2) ---------------------
    aff_loss = affinity_loss(out.affinity.float(), affinity_targets(aff_source, cfg.radius))
    # --- L_seg: balanced cross entropy on the seg logits upsampled to the crop (paper §3.4) ----
    seg_logits = upsample(out.seg_logits, images.shape[-2:])                   # (B, C, H, W)
    seg = seg_loss(seg_logits, seg_target)
    loss = cls_loss + cfg.seg_weight * seg + cfg.aff_weight * aff_loss
    terms = {"cls": cls_loss.detach(), "seg": seg.detach(), "aff": aff_loss.detach()}
    # --- L_reg: dense-CRF energy of the seg softmax, seg target as label, valid box as ROI (§3.4)
    if cfg.reg_weight > 0:
        reg = reg_loss(seg_logits, images, valid_box, seg_target)
        loss = loss + cfg.reg_weight * reg
        terms["reg"] = reg.detach()
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
                      generator=torch.Generator(), worker_init_fn=leave_stop_signals_to_main)


def leave_stop_signals_to_main(worker_id: int) -> None:
    """In a DataLoader worker: ignore SIGINT / SIGTERM. `timeout`, SLURM and Ctrl-C signal the
    whole process group; a worker killed by them would take the run down (a RuntimeError in the
    next forward) before the main process could save. The main process stops its workers when
    it exits."""
    for signum in StopSignal.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


SYNTHETIC_HINT = "the synthetic preset is active; did you mean --data VOC2012?"


def build_datasets(cfg: Config):
    """(train set, val set) of the run. A mask with class ids the synthetic preset does not know,
    in a --data-root of the user's, most likely means a forgotten --data: the error says so."""
    cache_dir = os.path.join(cfg.work_dir, "cache")
    if cfg.data == "synthetic" and not os.path.isdir(cfg.data_root):
        synthetic.make_synthetic(cfg.data_root)  # once; a set made with other sizes is kept
    common = dict(num_classes=cfg.num_classes, cache_dir=cache_dir)
    try:
        train_set = data.build_dataset(cfg.data, cfg.data_root, cfg.train_split, train=True,
                                       crop_size=cfg.crop, rescale_range=tuple(cfg.rescale),
                                       **common)
        val_set = data.build_dataset(cfg.data, cfg.data_root, cfg.val_split, train=False, **common)
    except data.DatasetError as e:
        own_root = cfg.data_root != PRESETS["synthetic"]["data_root"]
        if cfg.data == "synthetic" and own_root and "class ids" in str(e):
            raise data.DatasetError(f"{one_line(e)}; {SYNTHETIC_HINT}") from e
        raise
    return train_set, val_set


def load_datasets(cfg: Config, rank: int, world: int):
    """Every process builds the sets once: rank 0 first (it writes the synthetic set and the
    image-level label caches), the others after it, reading those caches."""
    if rank > 0:
        dist.barrier()
    sets = build_datasets(cfg)
    if rank == 0 and world > 1:
        dist.barrier()
    return sets


# =============================================================================================
# Checkpoints: atomic writes, the last K kept, everything needed to resume exactly
# =============================================================================================
CHECKPOINT_NAME = re.compile(r"(iter|interrupted_iter|nonfinite_iter)_(\d+)\.pth")


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


def load_checkpoint(path: str, missing_hint: str = "pass the path of a .pth written by train.py "
                    "(work_dir/checkpoints/), or --resume auto") -> dict:
    """Read a checkpoint written by this script, with one clear message for each failure;
    `missing_hint` ends the message for a file that does not exist."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} does not exist; {missing_hint}")
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


def checkpoints(work_dir: str, kinds=("iter", "interrupted_iter", "nonfinite_iter")) -> list:
    """Paths of the run's checkpoints of these kinds, oldest first (by step, then by time)."""
    folder = os.path.join(work_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = CHECKPOINT_NAME.fullmatch(name)
        if match and match.group(1) in kinds:
            path = os.path.join(folder, name)
            found.append((int(match.group(2)), os.path.getmtime(path), path))
    return [path for *_, path in sorted(found)]


def latest_checkpoint(work_dir: str) -> str | None:
    """The newest checkpoint of any kind (periodic, interrupted, non-finite), by step."""
    found = checkpoints(work_dir)
    return found[-1] if found else None


# =============================================================================================
# The work dir: one run per folder
# =============================================================================================
RUN_FILES = ("config.json", "log.jsonl", "metrics.json")


def existing_run_files(work_dir: str) -> list:
    """The files of a run already in `work_dir` (logs, metrics, checkpoints); the label cache
    does not count."""
    files = [os.path.join(work_dir, n) for n in RUN_FILES if os.path.isfile(os.path.join(work_dir, n))]
    return files + checkpoints(work_dir)


def check_new_run(cfg: Config) -> None:
    """A run without --resume must not write into another run's folder: refuse in one line."""
    if cfg.resume or cfg.overwrite:
        return
    found = existing_run_files(cfg.work_dir)
    if found:
        names = ", ".join(os.path.relpath(p, cfg.work_dir) for p in found[:3])
        raise ConfigError(f"work dir {cfg.work_dir} already holds a run ({names}"
                          f"{', ...' if len(found) > 3 else ''}); continue it with --resume auto, "
                          "start it over with --overwrite, or pass another --work-dir")


def prepare_work_dir(cfg: Config) -> None:
    """Rank 0: a writable folder; with --overwrite the old run's files and figures removed."""
    try:
        os.makedirs(os.path.join(cfg.work_dir, "checkpoints"), exist_ok=True)
        probe = os.path.join(cfg.work_dir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"work dir {cfg.work_dir} is not writable ({e.strerror}); pass "
                          "--work-dir with a folder you can write to") from e
    if cfg.overwrite and not cfg.resume:
        figures = os.path.join(cfg.work_dir, "figures")
        old_figures = [os.path.join(figures, n) for n in os.listdir(figures)] \
            if os.path.isdir(figures) else []
        for path in existing_run_files(cfg.work_dir) + old_figures:
            os.remove(path)
    with open(os.path.join(cfg.work_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)


def trim_log(work_dir: str, start_step: int) -> None:
    """A resumed run continues the log from its checkpoint: later lines (of the steps it will
    run again) go."""
    path = os.path.join(work_dir, "log.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


# =============================================================================================
# Set-up: processes, data, model, resume
# =============================================================================================
def setup_distributed(cfg: Config):
    """(rank, world size, device); under torchrun the process group too: gloo on CPU, nccl on GPU."""
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
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if rank == 0:
            print(f"distributed: {world} processes, backend {backend}, {cfg.batch_size // world} "
                  f"images per process per iteration ({cfg.batch_size} in all)")
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


def warn_if_unlearnable(cfg: Config) -> None:
    """One line on stderr when the settings are the paper's but the weights are random."""
    if cfg.data != "synthetic" and not cfg.pretrained and not cfg.resume:
        print(f"warning: --data {cfg.data} without --pretrained: the encoder starts from random "
              f"weights, and with the paper's settings (lr {cfg.lr:g}, encoder norms frozen) it "
              "cannot learn; pass --pretrained mit_b1.pth (SegFormer's ImageNet-1k weights, see "
              "the README) or, from scratch, settings like the synthetic preset's (--lr 1e-3 "
              "--no-freeze-norm)", file=sys.stderr)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (x86: AVX512-BF16 or AMX); elsewhere, where
    PyTorch cannot tell, assumed so."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                           "_is_amx_tile_supported")]
    return not all(checks) or any(check() for check in checks)


def warn_if_bf16_is_emulated(cfg: Config, device: torch.device) -> None:
    """One line on stderr when --amp / --cam-bf16 would run bf16 on a CPU that emulates it."""
    flags = [flag for flag, on in (("--amp", cfg.amp), ("--cam-bf16", cfg.cam_bf16)) if on]
    if flags and device.type == "cpu" and not cpu_has_native_bf16():
        print(f"warning: {' and '.join(flags)}: this CPU has no bf16 instructions (AVX512-BF16 or "
              "AMX), so bf16 is emulated and makes the step several times slower, not faster; "
              f"drop {' and '.join(flags)}", file=sys.stderr)


def build_model(cfg: Config, device: torch.device, world: int) -> AFANet:
    """AFANet on `device`: encoder from --pretrained (unless resuming), norms frozen if asked,
    synchronised BatchNorm across GPUs."""
    model = AFANet(cfg.num_classes, backbone=cfg.backbone)
    if cfg.pretrained and not cfg.resume:
        try:
            loaded = load_pretrained(model.encoder, cfg.pretrained)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"--pretrained: {e}") from e
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"encoder initialised from {cfg.pretrained} ({loaded})")
    if cfg.freeze_norm:
        freeze_encoder_norms(model)
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device)


def resume_from(cfg: Config, model: AFANet, optimizer, scaler, log) -> tuple:
    """(start step, validation history): from --resume (a path, or 'auto': the newest checkpoint
    in the work dir), or (0, []) for a new run."""
    path = latest_checkpoint(cfg.work_dir) if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto" and path is None:
        log(f"--resume auto: no checkpoint in {cfg.work_dir}/checkpoints, starting afresh")
    if not path:
        return 0, []
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, cfg, path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    log(f"resumed from {path} at iteration {ckpt['step']}")
    if ckpt["step"] >= cfg.iters:
        log(f"nothing to do: the checkpoint is at iteration {ckpt['step']} of {cfg.iters}")
    return ckpt["step"], ckpt.get("history", [])


def compile_and_wrap(model: AFANet, cfg: Config, device: torch.device, world: int):
    """The module the loop calls: `model`, compiled if asked, inside DDP when distributed."""
    if cfg.compile:
        # One graph per input shape: the multi-scale CAM feeds the encoder 3 more shapes than the
        # training forward, and with dynamic shapes inductor fails on the encoder (torch 2.13).
        model.encoder.compile(dynamic=False)
        model.decoder.compile(dynamic=False)
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def make_loaders(cfg: Config, train_set, val_set, start_step: int, rank: int, world: int):
    """The training stream from `start_step` on (this process's share) and the val shard."""
    # A dedicated generator keeps the DataLoader from drawing on the global RNG (exact resume).
    loader = DataLoader(TrainStream(train_set, cfg.seed), batch_size=cfg.batch_size // world,
                        sampler=StepSampler(start_step, cfg.iters, cfg.batch_size, rank, world),
                        num_workers=cfg.workers, generator=torch.Generator(),
                        worker_init_fn=leave_stop_signals_to_main, drop_last=False)
    return loader, shard_loader(val_set, cfg.val_batch_size, rank, world, cfg.workers)


# =============================================================================================
# Training
# =============================================================================================
class PhaseTimes:
    """Wall-clock seconds per phase of the run, for the speed line at its end: a user can tell a
    slow machine from a slow program."""

    def __init__(self):
        self.seconds, self.counts = {}, {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.counts[phase] = self.counts.get(phase, 0) + 1

    def summary(self) -> str:
        """"classification-only steps 0.30 s/it (301), full steps 0.74 s/it (599), …"."""
        return ", ".join(f"{phase} {self.seconds[phase] / n:.2f} s{'' if phase == 'validation' else '/it'}"
                         f" ({n})" for phase, n in self.counts.items())


@dataclass
class Run:
    """What the loop works with, built once by `train`."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    model: AFANet                 # the network (unwrapped)
    net: torch.nn.Module          # what the forward calls: the model, or its DDP wrapper
    par: PAR
    optimizer: torch.optim.Optimizer
    autocast: Callable            # () -> the forward's autocast context
    scaler: torch.amp.GradScaler | None
    history: list                 # every validation so far
    times: PhaseTimes = field(default_factory=PhaseTimes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class TrainResult(NamedTuple):
    model: AFANet                # the trained network (unwrapped)
    metrics: dict                # the last validation scores


def train(cfg: Config) -> TrainResult:
    """Run the whole training (or its remainder, when resuming)."""
    rank, world, device = setup_distributed(cfg)
    log = print if rank == 0 else (lambda *a, **k: None)
    check_new_run(cfg)
    if world > 1:
        dist.barrier()                       # every process has looked before rank 0 writes
    if rank == 0:
        prepare_work_dir(cfg)
        log("config:\n" + "\n".join(f"  {k} = {v}" for k, v in dataclasses.asdict(cfg).items()))
    if world > 1:
        dist.barrier()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    train_set, val_set = load_datasets(cfg, rank, world)
    model = build_model(cfg, device, world)
    if rank == 0:
        warn_if_unlearnable(cfg)
        warn_if_bf16_is_emulated(cfg, device)
    optimizer = build_optimizer(model, cfg)
    autocast, scaler = make_autocast(cfg, device)
    start_step, history = resume_from(cfg, model, optimizer, scaler, log)
    if rank == 0 and cfg.resume:
        trim_log(cfg.work_dir, start_step)
    net = compile_and_wrap(model, cfg, device, world)
    run = Run(cfg, rank, world, device, model, net, PAR(num_iter=cfg.par_iters).to(device),
              optimizer, autocast, scaler, history)
    loader, val_loader = make_loaders(cfg, train_set, val_set, start_step, rank, world)
    t_start = time.time()
    metrics = train_loop(run, loader, val_loader, val_set, start_step)
    if rank == 0 and history:
        print(metrics_table(history))
        print(f"done in {time.time() - t_start:.0f} s; checkpoints in {cfg.work_dir}/checkpoints")
        print(f"speed on this machine: {run.times.summary()}")
    if world > 1:
        dist.destroy_process_group()
    return TrainResult(model, metrics)


def train_loop(run: Run, loader, val_loader, val_set, start_step: int) -> dict:
    """Steps start_step … iters−1: the step, its update, the log; validation and checkpoints
    every eval_every; a stop after a non-finite loss, on SIGINT / SIGTERM, or when a data-loading
    worker dies. Returns the last validation's scores."""
    cfg = run.cfg
    bar = tqdm(total=cfg.iters, initial=start_step, disable=not run.is_main, dynamic_ncols=True,
               desc="train")
    running, started = {}, time.time()
    metrics = run.history[-1] if run.history else {}
    done, before = start_step, None  # steps completed; the state a step in progress started from
    stop = StopSignal.install()
    try:
        for step, batch in zip(range(start_step, cfg.iters), loader):
            batch = to_device(batch, run.device)
            set_lr(run.optimizer, step, cfg)
            before = StepStart.take(run.model)  # undone if the step cannot be completed
            step_started = time.perf_counter()
            out = compute_losses(run.net, run.model, run.par, batch, step, cfg, run.autocast)
            # One host sync per step: the loss values, for the log and the finiteness check.
            values = dict(zip(out.terms, torch.stack(list(out.terms.values())).tolist()))
            signum, finite = agree(run, stop.signum, all(map(math.isfinite, values.values())))
            if not finite:
                stop_nonfinite(run, step, values, before)
            with deferred(signal.SIGCHLD):  # a worker's death is reported after the update
                update(run.optimizer, run.scaler, out.loss)
                done, before = step + 1, None
            run.times.add("classification-only steps" if step <= cfg.cam_iters else "full steps",
                          time.perf_counter() - step_started)
            running = log_progress(run, bar, running, values, done, started)
            if done % cfg.eval_every == 0 or done == cfg.iters:
                validation_started = time.perf_counter()
                metrics = validate_and_save(run, val_loader, val_set, done)
                run.times.add("validation", time.perf_counter() - validation_started)
            if signum:
                stop_on_signal(run, bar, done, signum)
    except RuntimeError as error:
        if "DataLoader worker" not in str(error):
            raise
        stop_worker_died(run, done, before, error)
    finally:  # also on an error: the bar ends before the message, the signals are the caller's
        bar.close()
        stop.restore()
    return metrics


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def update(optimizer: torch.optim.Optimizer, scaler, loss: torch.Tensor) -> None:
    """Backward and one AdamW step (through the fp16 loss scaler where there is one)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def agree(run: Run, signum: int | None, finite: bool) -> tuple:
    """(signal number or 0, all finite) agreed by every process, so that all stop at one step."""
    if run.world == 1:
        return signum or 0, finite
    flags = torch.tensor([signum or 0, 0 if finite else 1], device=run.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0]), not bool(flags[1])


def log_progress(run: Run, bar, running: dict, values: dict, done: int, started: float) -> dict:
    """Accumulate the loss values; every log_every steps one line in log.jsonl and on the bar.
    Returns the running sums (emptied after each line)."""
    cfg = run.cfg
    for k, v in values.items():
        running[k] = running.get(k, 0.0) + v
    running["n"] = running.get("n", 0) + 1
    bar.update(1)
    if done % cfg.log_every and done != cfg.iters:
        return running
    means = {k: v / running["n"] for k, v in running.items() if k != "n"}
    bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
    if run.is_main:
        with open(os.path.join(cfg.work_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": done, "lr": run.optimizer.param_groups[0]["lr"], **means,
                                "time": time.time() - started}) + "\n")
    return {}


def save(run: Run, step: int, name: str | None = None) -> str | None:
    """Rank 0 writes the checkpoint `name` (default iter_<step>.pth) and keeps the last
    keep_ckpts periodic ones; returns its path (None on the other processes)."""
    if not run.is_main:
        return None
    path = os.path.join(run.cfg.work_dir, "checkpoints", name or f"iter_{step}.pth")
    save_checkpoint(path, {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": step,
        "config": dataclasses.asdict(run.cfg), "rng": rng_state(), "history": run.history,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None})
    periodic = checkpoints(run.cfg.work_dir, kinds=("iter",))
    for old in periodic[:-run.cfg.keep_ckpts]:
        os.remove(old)
    return path


def validate_and_save(run: Run, val_loader, val_set, step: int) -> dict:
    """The validation scores (metrics.json, a line on screen), the figures, a checkpoint."""
    cfg = run.cfg
    run.model.eval()
    settings = LabelSettings.from_config(cfg)
    scores = validate(run.model, val_loader, cfg.num_classes, run.device, settings, world=run.world)
    metrics = {"step": step, **scores}
    run.history.append(metrics)
    if run.is_main:
        if cfg.num_figures > 0:
            training_figure(run.model, run.par, val_set, range(min(cfg.num_figures, len(val_set))),
                            os.path.join(cfg.work_dir, "figures", f"val_iter_{step}.png"),
                            run.device, class_names_of(cfg.data, cfg.num_classes), settings)
        write_metrics(cfg.work_dir, run.history)
        tqdm.write(format_metrics(metrics))
    save(run, step)
    run.model.train()
    return metrics


def write_metrics(work_dir: str, history: list) -> None:
    """metrics.json: the latest validation at the top level, every validation under 'history'."""
    path = os.path.join(work_dir, "metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**history[-1], "history": history}, f, indent=2)
    os.replace(tmp, path)


class StepStart(NamedTuple):
    """What a step changes before its update: the norms' running statistics (a few hundred
    numbers) and the random state. Kept so that a step that cannot finish is undone before a
    checkpoint is saved, and resuming from it repeats the step exactly."""
    buffers: list
    rng: dict

    @classmethod
    def take(cls, model: AFANet) -> StepStart:
        return cls([b.clone() for b in model.buffers()], rng_state())

    def restore(self, model: AFANet) -> None:
        with torch.no_grad():
            for b, kept in zip(model.buffers(), self.buffers):
                b.copy_(kept)
        set_rng_state(self.rng)


@contextlib.contextmanager
def deferred(signum: int):
    """Hold back the Python handler of `signum` until the block is over (then run it once), so
    that an exception it raises (DataLoader's on SIGCHLD) cannot cut an optimizer step in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signum, lambda s, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signum, previous)
        if caught and callable(previous):
            previous(signum, caught[-1])


def stop_nonfinite(run: Run, step: int, values: dict, before: StepStart) -> None:
    """Undo the step's statistics, save the weights from before it, stop with one line."""
    before.restore(run.model)
    name = f"nonfinite_iter_{step}.pth"
    path = save(run, step, name=name) or os.path.join(run.cfg.work_dir, "checkpoints", name)
    if run.world > 1:
        dist.barrier()                          # the file is complete before anyone exits
    where = f" (on one of the {run.world} processes; this one's losses)" if run.world > 1 else ""
    raise FloatingPointError(
        f"non-finite loss at iteration {step}{where}: {values}. The weights before this step are "
        f"saved in {path}; lower --lr or try without --amp, then --resume it.")


def stop_on_signal(run: Run, bar, done: int, signum: int) -> None:
    """After the first SIGINT / SIGTERM: save, say how to continue, exit with 128 + signal."""
    path = save(run, done, name=f"interrupted_iter_{done}.pth")
    if run.world > 1:
        dist.barrier()                          # the file is complete before anyone exits
        dist.destroy_process_group()
    bar.close()
    if run.is_main:
        print(f"\ninterrupted after iteration {done} ({signal.Signals(signum).name}); saved "
              f"{path}; continue with --resume auto (or --resume {path})", flush=True)
    raise SystemExit(128 + signum)


class WorkerDied(Exception):
    """A data-loading worker process died (most often killed by the system for lack of memory)."""


def stop_worker_died(run: Run, done: int, before: StepStart | None, error: RuntimeError) -> None:
    """Undo the step in progress, save the state after the last completed one, stop with one
    line. Under DDP only rank 0 writes; another rank names the newest checkpoint there is."""
    if before is not None:
        before.restore(run.model)
    path = save(run, done, name=f"interrupted_iter_{done}.pth")
    saved = (f"the state after iteration {done} is saved in {path}" if path else
             f"the newest checkpoint is {latest_checkpoint(run.cfg.work_dir)}")
    what = one_line(error).rstrip(". ")
    raise WorkerDied(
        f"a data-loading worker died ({what}), most often because the system ran out of "
        f"memory: lower --workers or --batch-size. {saved}; continue with --resume auto")


class StopSignal:
    """The first SIGINT (Ctrl-C) or SIGTERM (a cluster's time limit or preemption) asks the loop
    to finish its step, save a checkpoint and exit; a second Ctrl-C stops at once. A second
    SIGTERM changes nothing: torchrun passes its own SIGTERM on to the ranks that the group's
    already reached, and SLURM follows its SIGTERM with a SIGKILL anyway."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.previous = {}

    @classmethod
    def install(cls) -> StopSignal:
        stop = cls()
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread
            for signum in cls.SIGNALS:
                stop.previous[signum] = signal.getsignal(signum)
                signal.signal(signum, stop.handle)
        return stop

    def handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this iteration"
                   f"{again}")

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            if handler is not None:
                signal.signal(signum, handler)


# =============================================================================================
# Command line
# =============================================================================================
USER_ERRORS = (ConfigError, data.DatasetError, FloatingPointError, WorkerDied)


def one_line(error: Exception) -> str:
    """The message of a user error; one raised in a DataLoader worker arrives wrapped in the
    worker's traceback, whose last line is the original message."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def exit_code(command: Callable[[], object], debug: bool) -> int:
    """Run `command()`: 0 when it returns; a user error is printed as one line "error: …" and
    gives 2 (with `debug`, it is raised with its traceback)."""
    try:
        command()
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return exit_code(lambda: train(parse_config(argv)), debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
