"""The run's configuration (paper §4.1): one dataclass with the paper's numbers, the presets.

`Config` holds the numbers of the paper's VOC 2012 run, with a line of help on each field;
`PRESETS` changes what a data set needs (`synthetic` trains from scratch on a CPU, `COCO` follows
the release's COCO script); `parse_config` generates the command line from the fields, so that any
flag overrides both, and `check_config` refuses contradictory settings before anything is built.
train.py parses it and saves it in every checkpoint; evaluate.py reads it back from one; bench.py
builds one for its timings. Where the authors' release names a setting, the field keeps its name
(`cam_iters`, `bkg_score`), so that its configuration reads across.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field

from model import BACKBONES, PAIRWISE  # what the network builds, to check --backbone and
                                      # --propagate-with against


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
    tf32: bool = opt(True, "on GPUs (Ampere and later), float32 matrix multiplies and convolutions "
                           "in TF32, as the release ran (torch 1.7's default): faster, the same "
                           "numbers to about 1e-3 relative; off: strict float32")
    compile: bool = opt(False, "torch.compile the training forward and backward (the pseudo "
                                 "labels and validation run eager)")
    speed_paths: bool = opt(True, "run the speed variants of fast.py (the same numbers up to float "
                                  "rounding); off: the plain forms of the method files alone")
    resume: str = opt("", "checkpoint to resume from ('auto': the newest in work_dir)")
    eval_every: int = opt(2000, "validate and checkpoint every this many iterations")
    log_every: int = opt(20, "write a log line every this many iterations")
    keep_ckpts: int = opt(3, "how many periodic checkpoints to keep")
    workers: int = opt(-1, "data-loading worker processes per training process; -1: the cores "
                           "per training process on this machine, at most 8")
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
    # Built-in data, trained from scratch on a 2-core CPU in about five minutes. What from-scratch
    # training needs differs from the paper (docs/differences.md, "The synthetic preset"): a larger learning
    # rate, trainable norms, milder rescaling, short phases (L_aff as long before the AFA label
    # takes over as after), a stronger L_aff, a small encoder and crop. Two speed choices change
    # the numbers: the CAM passes leave the decoder's BatchNorm statistics alone (cam_bn_stats;
    # only eval-mode seg numbers depend on them) and reuse the forward's scale-1.0 CAMs
    # (reuse_forward_cam). All in float32: bf16 would be slower on CPUs without bf16 instructions.
    # The data are loaded in the training process (workers=0: the same batches, without 2 worker
    # processes competing for the 2 cores; docs/demo_study.md, "Round 4").
    # CAM scales, thresholds and PAR stay the paper's: with fewer scales the CAM alone is already
    # sharp at this size and PAR and AFA are left little to show (docs/demo_study.md).
    "synthetic": dict(data_root="data/synthetic", train_split="train", num_classes=6,
                      backbone="mit_b0", crop=128, rescale=(0.75, 1.5), batch_size=8,
                      iters=600, lr=1e-3, head_lr_mult=1.0, freeze_norm=False, warmup_iters=50,
                      cam_iters=200, switch_iters=400, aff_weight=1.0, cam_bn_stats=False,
                      reuse_forward_cam=True, eval_every=200,
                      log_every=10, workers=0, val_batch_size=16, work_dir="work_dirs/synthetic"),
}

HELP_PRESETS = ("synthetic", "VOC2012", "COCO")  # the order in which --help lists the defaults


def note(line: str) -> None:
    """One "note: ..." line on stderr, from the first process only (every process of a torchrun
    parses the same flags)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"note: {line}", file=sys.stderr)


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


def parse_flags(argv=None, summary: str = "") -> dict:
    """The flags typed on the command line, as {field: value} (what was not typed is absent).
    `summary` opens the --help text (the calling script's first docstring line)."""
    description = (summary + "\n\n" if summary else "") + (
        "The defaults depend on the preset chosen with --data (synthetic when --data is not "
        "given);\nwhere the presets differ, each flag lists its default per preset. A resumed run "
        "(--resume) continues with its saved settings; a flag typed then overrides one of them.")
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
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
    return {k: tuple(v) if isinstance(v, list) else v
            for k, v in vars(parser.parse_args(argv)).items()}


def parse_config(argv=None, summary: str = "") -> Config:
    """Config = dataclass defaults ← preset of --data ← the flags given on the command line."""
    return config_from_flags(parse_flags(argv, summary))


def config_from_flags(given: dict) -> Config:
    """A new run's configuration: dataclass defaults ← preset of --data (its schedule scaled to
    a typed --iters, `scale_schedule`) ← the flags typed (`given`)."""
    preset = scale_schedule(PRESETS[given.get("data", Config.data)], given)
    cfg = Config(**{**yield_to_flags(preset, given), **given})
    check_config(cfg)
    return cfg


# The flags of one command, not settings of the run: a resumed run never counts them as changes.
COMMAND_ONLY = ("resume", "overwrite", "debug")


def resumed_config(saved: dict, given: dict) -> tuple:
    """(Config, overrides) of a resumed run: the run's saved settings (`saved`, a checkpoint's
    "config"), with the flags typed on the resume command (`given`) over them where typed.
    Presets play no part: a setting the run saved is never replaced by a preset's default.
    `overrides` maps each field a typed flag changed to (the run's value, the new value)."""
    names = {f.name for f in dataclasses.fields(Config)}
    base = {**PRESETS.get(saved.get("data"), {}),  # for a field the checkpoint predates
            **{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names}}
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    overrides = {k: (base.get(k, defaults[k]), v) for k, v in given.items()
                 if k not in COMMAND_ONLY and base.get(k, defaults[k]) != v}
    cfg = Config(**{**base, **given})
    check_config(cfg)
    return cfg, overrides


# The preset's phase iterations, scaled with a typed --iters (the preset's whole schedule, shorter).
SCHEDULE = ("cam_iters", "switch_iters", "warmup_iters", "eval_every")


def scale_schedule(preset: dict, given: dict) -> dict:
    """The preset with the phase iterations that were not typed (`SCHEDULE`) scaled by
    given iters / the preset's iters, so that `--iters N` alone runs every phase of the method,
    each its share of N; one line on stderr says what changed."""
    defaults = {**{f.name: f.default for f in dataclasses.fields(Config)}, **preset}
    if "iters" not in given or given["iters"] == defaults["iters"]:
        return preset
    ratio = given["iters"] / defaults["iters"]
    scaled = {name: max(1, round(defaults[name] * ratio)) for name in SCHEDULE if name not in given}
    changed = {name: value for name, value in scaled.items() if value != defaults[name]}
    if changed:
        note(f"--iters {given['iters']} scales the preset's schedule ({defaults['iters']} "
              "iterations): " + ", ".join(f"--{name.replace('_', '-')} {defaults[name]}→{value}"
                                          for name, value in changed.items()))
    return {**preset, **changed}


def yield_to_flags(preset: dict, given: dict) -> dict:
    """The preset without the defaults that would contradict a flag given on the command line: a
    preset's default never turns an explicit flag into an error (a note on stderr says what
    changed)."""
    preset = dict(preset)
    defaults = {**{f.name: f.default for f in dataclasses.fields(Config)}, **preset}

    def set_default(name, value, why):
        if name not in given and defaults[name] != value:
            preset[name] = value
            flag = name.replace("_", "-")
            flag = (f"--{'' if value else 'no-'}{flag}" if isinstance(value, bool) else
                    f"--{flag} {value}")
            note(f"{why}: {flag} for this run, against the preset's default")
    if given.get("aff_weight", None) == 0:
        set_default("aff_from_afa", False, "--aff-weight 0 trains no affinity to take labels from")
    if "switch_iters" in given and "cam_iters" not in given:
        set_default("cam_iters", min(defaults["cam_iters"], given["switch_iters"]),
                    f"--switch-iters {given['switch_iters']} comes before the preset's --cam-iters")
    if "cam_iters" in given and "switch_iters" not in given:
        set_default("switch_iters", max(defaults["switch_iters"], given["cam_iters"]),
                    f"--cam-iters {given['cam_iters']} comes after the preset's --switch-iters")
    return preset


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
    if cfg.propagate_with not in PAIRWISE:
        fail(f"--propagate-with {cfg.propagate_with}: choose {' or '.join(PAIRWISE)}")
    if cfg.reg_weight < 0:
        fail(f"--reg-weight {cfg.reg_weight}: give a weight >= 0 (0 turns L_reg off)")
    if cfg.aff_weight == 0 and cfg.seg_label == "afa" and cfg.propagate_with == "affinity":
        fail("--seg-label afa needs the learned affinity, which --aff-weight 0 leaves untrained; "
             "pass --seg-label par (or cam), or a positive --aff-weight")
    if cfg.aff_weight == 0 and cfg.aff_from_afa:
        fail("--aff-from-afa takes affinity labels for L_aff, which --aff-weight 0 turns off; "
             "drop --aff-from-afa or pass a positive --aff-weight")
    if cfg.workers < -1:
        fail(f"--workers {cfg.workers}: give a number of processes (0 loads in the training "
             "process), or -1 for one per core of this machine's share, at most 8")
    if cfg.num_classes < 2:
        fail("--num-classes counts background too: it must be at least 2")
