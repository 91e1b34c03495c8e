"""Evaluation of AFA (paper §4): the test-time protocol, pseudo-label quality, inference, figures.

    python evaluate.py --checkpoint work_dirs/synthetic/checkpoints/iter_600.pth    # seg mIoU (%), val
    python evaluate.py --checkpoint ... --crf                # + dense CRF (pip install pydensecrf2)
    python evaluate.py --checkpoint ... --pseudo             # pseudo-label quality on train
    python evaluate.py --checkpoint ... --image photos/      # masks and overlays of your images
    python evaluate.py --checkpoint ... --figures            # CAM / AFA / affinity / attention
    python evaluate.py --checkpoint wetr_iter_18000.pth      # the authors' release (VOC2012; --data COCO)

Segmentation (the paper's Table 1 protocol, as in the authors' test script): resize the long side
to 512; at each scale run the image with its horizontal flip and average the two seg logits;
take the element-wise max of the logits over scales (on the stride-4 grid of scale 1); upsample to
the image; arg-max — optionally after a dense CRF on the softmax (10 iterations, Gaussian sxy 3 /
compat 3, bilateral sxy 64 / srgb 5 / compat 4). Pseudo labels (the paper's Tables 2–3): on a
split with masks, the mIoU of the labels cam (the CAM label), par (CAM + PAR), walk (the
AFA-propagated CAM), afa (AFA + PAR, the training label) and of the seg branch, made by the training pipeline's own functions (pipeline.py).
The scores are metrics.py's, the figures visualize.py's; everything reads the run's configuration
from the checkpoint that `train.py` wrote. A trained network of the authors' release loads as it
is (pretrained.afanet_from_release); its file holds the weights alone, so the configuration is the
--data preset's (VOC2012 unless given) with the flags on top, and one line says what was assumed.

The authors' release differs from the paper: its test script uses the scales (1.0, 0.5, 0.75),
while the authors say the reported 66.0 mIoU used scales 0.5–1.5; we default to the script's.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import spin_count  # noqa: F401  (first: it sets OpenMP's spin count before torch loads)

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import synthetic
from config import PRESETS, Config, ConfigError, check_config
from metrics import confusion_matrix, scores_table, segmentation_scores
from model import BACKBONES, AFANet
from par import PAR
from pipeline import LabelSettings, make_pseudo_labels, token_grid, upsample
from pretrained import RELEASE_SIGNATURES, afanet_from_release, describe_state, release_prefix
from runner import (check_compatible, data_workers, device_line, exit_code, keep_freed_memory,
                    read_torch_file, set_cuda_math, usable_cores, warn_if_no_gpu)
from visualize import attention_figure, class_names_of, image_to_rgb, save_prediction

IGNORE_INDEX = data.IGNORE_INDEX
TEST_SCALES = (1.0, 0.5, 0.75)       # the release's test script (paper §4.1 reports 0.5–1.5)
TEST_LONG_SIDE = 512
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CRF_INSTALL = ("--crf needs the pydensecrf2 package: pip install pydensecrf2 (it builds from "
               "source in about a minute and needs a C++ compiler), or run without --crf")


# ---------------------------------------------------------------------------------------------
# Test-time segmentation (paper §4.1): long side 512, scales with flips, max over scales
# ---------------------------------------------------------------------------------------------
def resize_long_side(images: torch.Tensor, long_side: int) -> torch.Tensor:
    """images (B, 3, H, W) → (B, 3, H', W') with max(H', W') = long_side; sides truncated by int()."""
    H, W = images.shape[-2:]
    ratio = long_side / max(H, W)
    size = (int(H * ratio), int(W * ratio))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)  # (B, 3, H', W')


def seg_logits(model: AFANet, images: torch.Tensor) -> torch.Tensor:
    """The decoder's logits (B, C, H/4, W/4) alone."""
    features, _ = model.encoder(images)
    return model.decoder(features)


@torch.no_grad()
def multi_scale_seg_logits(model: AFANet, images: torch.Tensor, scales=TEST_SCALES,
                           long_side: int = TEST_LONG_SIDE) -> torch.Tensor:
    """Seg logits (B, C, H, W) of the test-time protocol (paper §4.1) for images (B, 3, H, W).

    In the order of the authors' test script: resize the long side to `long_side` (0 keeps the
    size); at each scale s (images resized by s) run the images with their mirrors, average each
    image's logits with the un-flipped logits of its mirror, resize to the stride-4 grid of scale
    1; take the element-wise max over scales; upsample to H × W. Logits throughout, no softmax.
    The scales are used as given (the release's script always runs 1.0 besides its list).
    """
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive numbers, got {scales}")
    B, _, H, W = images.shape
    resized = resize_long_side(images, long_side) if long_side else images  # (B, 3, H', W')
    Hr, Wr = resized.shape[-2:]
    decoder_stride = model.encoder.strides[0]            # the decoder works at stage 1's stride
    # Stage 1's key/value reduction is a conv with kernel sr_ratio on its stride-4 grid.
    reduction = model.encoder.sr_ratios[0]
    if min(token_grid(int(s * side), decoder_stride) for s in scales for side in (Hr, Wr)) < reduction:
        smallest = decoder_stride * (reduction - 1) + 1
        raise ValueError(f"scale {min(scales)} of the {Hr}×{Wr} (resized) images is smaller than "
                         f"the encoder's minimum input side {smallest}; use larger scales or long_side")
    grid = (token_grid(Hr, decoder_stride), token_grid(Wr, decoder_stride))  # scale-1 logit grid
    best = None
    for s in scales:
        # scale_factor (not a size), as in the release: it also sets the sampling positions
        scaled = resized if s == 1.0 else F.interpolate(
            resized, scale_factor=s, mode="bilinear", align_corners=False)  # (B, 3, sH', sW')
        both = torch.cat([scaled, scaled.flip(-1)], dim=0)              # (2B, 3, sH', sW')
        logits = seg_logits(model, both).float()                        # (2B, C, sH'/4, sW'/4)
        if logits.shape[-2:] != grid:
            logits = F.interpolate(logits, size=grid, mode="bilinear",
                                   align_corners=False)                 # (2B, C, h4, w4)
        logits = (logits[:B] + logits[B:].flip(-1)) / 2                 # flip-averaged (B, C, h4, w4)
        best = logits if best is None else torch.maximum(best, logits)  # max over scales
    return F.interpolate(best, size=(H, W), mode="bilinear", align_corners=False)  # (B, C, H, W)


# ---------------------------------------------------------------------------------------------
# Dense CRF (paper §4.1), in worker processes
# ---------------------------------------------------------------------------------------------
def import_densecrf():
    """The optional pydensecrf2 package (module `pydensecrf`), or a ConfigError saying how to get it."""
    try:
        import pydensecrf.densecrf as densecrf
        import pydensecrf.utils as densecrf_utils
    except ImportError as e:
        raise ConfigError(CRF_INSTALL) from e
    return densecrf, densecrf_utils


def dense_crf(image: np.ndarray, probs: np.ndarray, iterations: int = 10, gaussian_sxy: float = 3,
              gaussian_compat: float = 3, bilateral_sxy: float = 64, bilateral_srgb: float = 5,
              bilateral_compat: float = 4) -> np.ndarray:
    """Mean-field dense CRF: image (H, W, 3) uint8 RGB, probs (C, H, W) softmax → (C, H, W) float32.

    Unary −log p (p clipped at 1e-5); a Gaussian kernel on position and a bilateral kernel on
    position and colour, Potts compatibilities; the defaults are the release's test script's.
    """
    densecrf, densecrf_utils = import_densecrf()
    if image.ndim != 3 or image.shape[2] != 3 or probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"image must be (H, W, 3) and probs (C, H, W) of the same H, W; got "
                         f"{image.shape} and {probs.shape}")
    C, H, W = probs.shape
    crf = densecrf.DenseCRF2D(W, H, C)
    crf.setUnaryEnergy(np.ascontiguousarray(densecrf_utils.unary_from_softmax(probs)))  # (C, H·W)
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb,
                             rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=bilateral_compat)
    return np.asarray(crf.inference(iterations), dtype=np.float32).reshape(C, H, W)


def crf_label(image: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Arg-max of the dense CRF: (H, W) uint8. A top-level function, so worker processes can run it."""
    return dense_crf(image, probs).argmax(0).astype(np.uint8)


def crf_job(name: str, image: np.ndarray, probs: np.ndarray) -> tuple:
    """(name, crf_label(image, probs)): the unit of work of the CRF processes."""
    return name, crf_label(image, probs)


def map_in_processes(fn, items, workers: int):
    """fn(*item) for each item, in order; in `workers` processes (here when 0), 2·workers queued.

    The bounded queue keeps memory flat: `items` is produced lazily (the network runs in this
    process meanwhile) and only a few softmax maps wait at any time.
    """
    if workers <= 0:
        for item in items:
            yield fn(*item)
        return
    # spawn: a fresh interpreter, never a fork of a process whose torch threads are running
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, *item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------------------------------------
# Segmentation evaluation of a split
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_segmentation(model: AFANet, loader, num_classes: int, device, scales=TEST_SCALES,
                          long_side: int = TEST_LONG_SIDE, crf: bool = False, workers: int = 0,
                          save_dir: str | None = None) -> dict:
    """Scores (`segmentation_scores`) of the test-time prediction over a split with masks.

    With `crf`, the prediction is the arg-max of the dense CRF on its softmax, computed in
    `workers` processes; with `save_dir`, each prediction is written as `save_dir/<name>.png`
    (palette PNG, VOC colours) with an overlay in `save_dir/overlay/<name>.png`.
    """
    if crf:
        import_densecrf()                   # fail before the first forward, not in a worker
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def predictions():
        # Per image from here: CRF and files are per image. Yields (name, gt, rgb, pred or probs).
        for batch in loader:
            logits = multi_scale_seg_logits(model, batch["image"].to(device), scales,
                                            long_side)                # (B, C, H, W)
            for b, name in enumerate(batch["name"]):
                rgb = image_to_rgb(batch["image"][b])                   # (H, W, 3) uint8
                out = logits[b].softmax(0).cpu().numpy() if crf else logits[b].argmax(0).cpu()
                yield name, batch["label"][b], rgb, out

    stream = predictions()
    if crf:
        pending = {}                             # name → (gt, rgb) while its CRF runs

        def jobs(source):
            for name, gt, rgb, probs in source:
                pending[name] = (gt, rgb)
                yield name, rgb, probs
        stream = ((name, *pending.pop(name), torch.from_numpy(label).long())
                  for name, label in map_in_processes(crf_job, jobs(stream), workers))
    for name, gt, rgb, pred in tqdm(stream, total=len(loader.dataset), desc="segment",
                                    unit="image", dynamic_ncols=True):
        conf += confusion_matrix(pred, gt, num_classes)
        if save_dir:
            save_prediction(pred, rgb, save_dir, name)
    return segmentation_scores(conf)


# ---------------------------------------------------------------------------------------------
# Pseudo-label quality (paper Tables 2–3): every label of the training pipeline against the masks
# ---------------------------------------------------------------------------------------------
# Each label's one name (pipeline.PseudoLabels, metrics.json's "<name>_miou") and what it is.
PSEUDO_LABELS = (("cam", "cam: CAM"), ("par", "par: CAM + PAR"), ("walk", "walk: AFA random walk"),
                 ("afa", "afa: AFA + PAR, the training label"), ("seg", "seg: the seg branch"))


@torch.no_grad()
def pseudo_labels_of(model: AFANet, par: PAR, images: torch.Tensor, cls_labels: torch.Tensor,
                     settings: LabelSettings) -> dict:
    """The labels of `PSEUDO_LABELS`, each (B, H, W), for images (B, 3, H, W) with their
    image-level labels cls_labels (B, C-1), the whole image as valid box.

    "cam" the CAM label at `bkg_score` (paper §3.1); "par" the PAR label (§3.3); "walk" the
    arg-max of the random walk with background `low`, with the affinity the training step walks
    with (the largest CAM scale's; the in-training validation uses the release's eval-mode
    scale-1.0 affinity instead); "afa" the AFA pseudo label (§3.2), the segmentation target
    after the switch; "seg" the seg branch at one scale. `propagate_with="attention"`: both walks
    use the MHSA maps of the same blocks, scale and pass instead of the learned affinity
    (attention_affinity.mhsa_affinity; paper Table 4, "AFA (prop. with MHSA)").
    """
    B, _, H, W = images.shape
    whole = torch.tensor([[0, H, 0, W]], device=images.device).expand(B, 4)  # (B, 4) valid box
    labels = make_pseudo_labels(model, par, {"image": images, "cls_labels": cls_labels,
                                             "valid_box": whole},
                                settings.for_evaluation(), need=("cam", "par", "walk", "afa"))
    return {"cam": labels.cam, "par": labels.par, "walk": labels.walk, "afa": labels.afa,
            "seg": upsample(seg_logits(model, images), (H, W)).argmax(1)}


def pseudo_label_quality(model: AFANet, par: PAR, loader, num_classes: int, device,
                         settings: LabelSettings) -> dict:
    """mIoU of each label of `pseudo_labels_of` over a split with masks, at each image's size.

    The image-level labels are the ground truth's. Pixels a label leaves ignored (255) are not
    scored, as in the release's `pseudo_scores`; "labelled" gives the share of ground-truth
    pixels each label scores.
    Returns {"<key>_miou": float, ..., "labelled": {key: float}, "IoU": {key: [per class]}}.
    """
    keys = [k for k, _ in PSEUDO_LABELS]
    confs = {k: torch.zeros(num_classes, num_classes, dtype=torch.int64) for k in keys}
    valid_pixels = 0
    for batch in tqdm(loader, desc="pseudo labels", unit="batch", dynamic_ncols=True):
        gt = batch["label"]                                                   # (B, H, W)
        labels = pseudo_labels_of(model, par, batch["image"].to(device),
                                  batch["cls_labels"].to(device), settings)
        for k in keys:
            confs[k] += confusion_matrix(labels[k].cpu(), gt, num_classes)
        valid_pixels += int(((gt != IGNORE_INDEX) & (gt >= 0) & (gt < num_classes)).sum())
    scores = {k: segmentation_scores(confs[k]) for k in keys}
    return {**{f"{k}_miou": scores[k]["mIoU"] for k in keys},
            "labelled": {k: int(confs[k].sum()) / max(valid_pixels, 1) for k in keys},
            "IoU": {k: scores[k]["IoU"] for k in keys}}


def pseudo_table(result: dict) -> str:
    lines = ["| pseudo label | mIoU | pixels labelled |", "|---|---|---|"]
    lines += [f"| {name} | {100 * result[f'{k}_miou']:.1f} | {100 * result['labelled'][k]:.1f}% |"
              for k, name in PSEUDO_LABELS]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Inference on your own images
# ---------------------------------------------------------------------------------------------
def list_images(path: str) -> list:
    """The image files at `path`: the file itself, or the images in the folder (sorted)."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(IMAGE_SUFFIXES))
        if files:
            return files
        raise ConfigError(f"--image {path}: the folder holds no image "
                          f"({', '.join(IMAGE_SUFFIXES)}); pass a file or a folder of images")
    raise ConfigError(f"--image {path} does not exist; pass an image file or a folder of images")


def load_image(path: str) -> torch.Tensor:
    """An image file as the network's input (3, H, W), normalised like the data sets."""
    try:
        rgb = data.read_image(path).astype(np.float32)                        # (H, W, 3)
    except data.DatasetError as e:
        cause = e.__cause__ or e
        raise ConfigError(f"--image {path} cannot be read as an image ({type(cause).__name__}: "
                          f"{str(cause).rstrip('.')}); pass an image file "
                          f"({', '.join(IMAGE_SUFFIXES)}) or a folder of them") from e
    rgb = (rgb - np.asarray(data.IMAGENET_MEAN, np.float32)) / np.asarray(data.IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))     # (3, H, W)


@torch.no_grad()
def predict_images(model: AFANet, paths: list, out_dir: str, device, scales=TEST_SCALES,
                   long_side: int = TEST_LONG_SIDE, crf: bool = False) -> list:
    """Predict each image (one at a time: sizes differ); write its mask and overlay; return them."""
    if crf:
        import_densecrf()
    written = []
    for path in tqdm(paths, desc="predict", unit="image", dynamic_ncols=True):
        image = load_image(path)
        try:
            logits = multi_scale_seg_logits(model, image[None].to(device), scales,
                                            long_side)[0]               # (C, H, W)
        except ValueError as e:  # an image too small (or too narrow) for the encoder
            raise ConfigError(f"image {path}: {e}") from e
        rgb = image_to_rgb(image)
        if crf:
            pred = torch.from_numpy(crf_label(rgb, logits.softmax(0).cpu().numpy())).long()
        else:
            pred = logits.argmax(0).cpu()                                     # (H, W)
        name = os.path.splitext(os.path.basename(path))[0]
        written.append(save_prediction(pred, rgb, out_dir, name))
    return written


# =============================================================================================
# Command line
# =============================================================================================
# Run settings that may differ from the checkpoint's without changing the network.
CONFIG_OVERRIDES = ("data_root", "cam_scales", "bkg_score", "low", "high", "radius", "par_iters",
                    "propagate_with", "num_figures", "speed_paths", "tf32")
# Flags that must match the checkpoint: a different value is an error, not a conversion.
CONFIG_CHECKS = ("backbone", "num_classes")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a .pth written by train.py, or a "
                        "trained network of the authors' release (e.g. its wetr_iter_*.pth)")
    parser.add_argument("--data", choices=list(PRESETS), help="for a file of the authors' release, "
                        "which holds no configuration: the preset to assume (default: VOC2012; COCO "
                        "for the release's COCO network); a checkpoint of train.py names its own")
    parser.add_argument("--split", help="split to evaluate (default: the checkpoint's val split; "
                                        "'train' with --pseudo, as in the paper)")
    parser.add_argument("--scales", type=float, nargs="+", default=TEST_SCALES,
                        help=f"test scales, each with its flip (default: {TEST_SCALES})")
    parser.add_argument("--long-side", type=int, default=TEST_LONG_SIDE, help="resize the long "
                        f"side to this first; 0 keeps the size (default: {TEST_LONG_SIDE})")
    parser.add_argument("--crf", action="store_true", help="dense CRF on the prediction "
                                                           "(needs pip install pydensecrf2)")
    parser.add_argument("--save-masks", metavar="DIR", help="write the predicted masks (palette "
                        "PNGs) and overlays there")
    parser.add_argument("--pseudo", action="store_true", help="pseudo-label quality table")
    parser.add_argument("--image", metavar="PATH", help="predict an image file or a folder of them")
    parser.add_argument("--figures", nargs="*", metavar="NAME", help="CAM / AFA / affinity / "
                        "attention figures of these images of the split (default: the first "
                        "--num-figures), or of the --image images")
    parser.add_argument("--pixel", type=int, nargs=2, metavar=("Y", "X"), help="the pixel whose "
                        "affinity and attention the figures show, as (y, x): row, then column, "
                        "from the top-left corner (default: the centre of the largest predicted "
                        "object)")
    parser.add_argument("--out", help="output folder (default: <checkpoint without .pth>_eval)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--workers", type=int, default=-1, help="data-loading processes (default "
                        "-1: one per core, at most 8; 0 loads in this process)")
    parser.add_argument("--crf-workers", type=int, default=crf_workers(), help="dense-CRF "
                        "processes (default: 80%% of the cores, as the release's test script; "
                        f"here {crf_workers()}; 0 runs it in this process)")
    parser.add_argument("--batch-size", type=int, help="images per forward (default: 1 for the "
                        "segmentation table, whose images are enlarged to --long-side; the "
                        "checkpoint's val batch size for --pseudo)")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for name in CONFIG_OVERRIDES + CONFIG_CHECKS:
        f = fields[name]
        kind = {"int": int, "float": float, "str": str, "tuple": float}.get(f.type)
        what = ("must match the checkpoint; for the authors' release, default: the --data preset's"
                if name in CONFIG_CHECKS else "default: the checkpoint's")
        parser.add_argument("--" + name.replace("_", "-"), help=f"{f.metadata['help']} ({what})",
                            **(dict(action=argparse.BooleanOptionalAction) if f.type == "bool" else
                               dict(type=kind, nargs="+" if f.type == "tuple" else None)))
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser.parse_args(argv)


def crf_workers() -> int:
    """The release's dense-CRF pool: 80 % of the cores (at least 1): the CRF of each image is
    CPU work, while the network runs in this process."""
    return max(1, int(0.8 * usable_cores()))


def config_from_checkpoint(ckpt: dict, args: argparse.Namespace) -> Config:
    """The run's Config as saved in the checkpoint, with the flags given on top; for the authors'
    release (config None) the --data preset's (VOC2012 unless given), with the flags on top."""
    known = {f.name for f in dataclasses.fields(Config)}
    if ckpt["config"] is None:
        name = args.data or "VOC2012"
        saved = {**PRESETS[name], "data": name}
    else:
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()
                 if k in known}
        if args.data is not None and args.data != saved.get("data"):
            raise ConfigError(f"--data {args.data}: this checkpoint of train.py was trained with "
                              f"data={saved.get('data')}; --data picks the preset for a file of the "
                              f"authors' release only, which holds no configuration")
    given = {k: getattr(args, k) for k in CONFIG_OVERRIDES + CONFIG_CHECKS
             if getattr(args, k) is not None}
    cfg = Config(**{**saved, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}})
    check_config(cfg)
    return cfg


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device here; use --device cpu")
    return device


def read_checkpoint(path: str) -> dict:
    """The checkpoint at `path` as {"model": AFANet's state dict, "config": the run's Config fields,
    ...}: as train.py saved it, or for a trained network of the authors' release (its weights
    alone, renamed by `afanet_from_release`) with "config" None."""
    ckpt = read_torch_file(path, "pass --checkpoint with a .pth written by train.py (in its "
                           "work_dir/checkpoints/) or by the authors' release",
                           corrupt_hint="use an earlier checkpoint or download it again")
    if isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt:
        return ckpt
    if isinstance(ckpt, dict) and release_prefix(ckpt) is not None:
        return {"model": afanet_from_release(ckpt), "config": None}
    release_keys = ", ".join(f"[module.]{key}" for key in RELEASE_SIGNATURES)
    raise ConfigError(f"checkpoint {path} was not written by train.py (no 'model'/'config' entries) "
                      f"nor by the authors' release (no {release_keys}), the two layouts known "
                      f"here; for SegFormer ImageNet weights use train.py --pretrained instead")


def load_model(path: str, args: argparse.Namespace, device) -> tuple:
    """(AFANet in eval mode on `device`, its Config, its LabelSettings) from a checkpoint of
    train.py or a trained network of the authors' release (`read_checkpoint`); the settings also
    choose the network's implementation (`--speed-paths`, as the run trained)."""
    ckpt = read_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, args)
    if ckpt["config"] is None:
        print(f"{path}: a network of the authors' release, which saves no configuration; assumed "
              f"the {cfg.data} preset: backbone {cfg.backbone}, num_classes {cfg.num_classes} "
              f"(--data, --backbone, --num-classes change it)")
    else:
        check_compatible(ckpt, cfg, path)
    model = AFANet(cfg.num_classes, backbone=cfg.backbone)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        if ckpt["config"] is None:
            raise ConfigError(release_mismatch(path, ckpt["model"], cfg, e)) from e
        first = str(e).strip().split("\n")[0]
        raise ConfigError(f"checkpoint {path}: its weights do not fit AFANet(num_classes="
                          f"{cfg.num_classes}, backbone={cfg.backbone}) as its config says "
                          f"({first}); use a checkpoint written by train.py") from e
    model = model.to(device).eval()
    return model, cfg, LabelSettings.from_config(cfg, model)


def release_mismatch(path: str, state: dict, cfg: Config, error: RuntimeError) -> str:
    """One line for a file of the authors' release that does not fit the network assumed: the
    backbone and class count its tensors show, as the flags to pass."""
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    backbone = describe_state(encoder) or "an unknown encoder"
    num_classes = state["classifier.weight"].shape[0] + 1          # (C-1, C_4, 1, 1)
    if backbone not in BACKBONES:
        fix = "; no backbone of this project fits it"
    elif (backbone, num_classes) != (cfg.backbone, cfg.num_classes):
        fix = f"; pass --backbone {backbone} --num-classes {num_classes}"
    else:  # the sizes agree, the names do not: torch's first complaint says where
        detail = next((line.strip() for line in str(error).strip().split("\n")[1:] if line.strip()), "")
        fix = f", but its keys differ ({detail[:200]}{'...' if len(detail) > 200 else ''})"
    return (f"checkpoint {path} (the authors' release) does not fit the AFANet(num_classes="
            f"{cfg.num_classes}, backbone={cfg.backbone}) assumed ({cfg.data} preset and flags): "
            f"it holds backbone {backbone} with num_classes {num_classes}{fix}")


def load_split(cfg: Config, split: str, cache_dir: str):
    """A split with its masks, unaugmented, at the images' own size."""
    if cfg.data == "synthetic" and not os.path.isdir(cfg.data_root):
        synthetic.make_synthetic(cfg.data_root)  # as train.py does: the same seeded set
    return data.build_dataset(cfg.data, cfg.data_root, split, train=False,
                              num_classes=cfg.num_classes, cache_dir=cache_dir)


def write_metrics(out_dir: str, entries: dict) -> str:
    """Merge `entries` into out_dir/metrics.json (separate runs into one folder add up)."""
    path = os.path.join(out_dir, "metrics.json")
    metrics = {}
    if os.path.isfile(path):
        with open(path) as f:
            metrics = json.load(f)
    metrics.update(entries)
    with open(path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def check_pixel(pixel, image: torch.Tensor) -> None:
    """--pixel (y, x) must lie inside the image (3, H, W)."""
    H, W = image.shape[-2:]
    if pixel is not None and not (0 <= pixel[0] < H and 0 <= pixel[1] < W):
        raise ConfigError(f"--pixel {pixel[0]} {pixel[1]}: (y, x) lies outside the {H}×{W} "
                          f"(H×W) image; give 0 <= y < {H} and 0 <= x < {W}")


def figures_of_split(model, cfg: Config, settings: LabelSettings, dataset, chosen: list,
                     out_dir: str, names, pixel=None) -> None:
    """--figures on images of a split: the named ones, or the first cfg.num_figures."""
    for name in chosen or dataset.names[:cfg.num_figures]:
        if name not in dataset.names:
            raise ConfigError(f"--figures {name}: no such image in split {dataset.split!r} "
                              f"(e.g. {', '.join(dataset.names[:3])})")
        sample = dataset[dataset.names.index(name)]
        check_pixel(pixel, sample["image"])
        path = os.path.join(out_dir, "figures", name + ".png")
        attention_figure(model, sample["image"], path, names, cls_labels=sample["cls_labels"],
                         truth=sample["label"], pixel=pixel,
                         settings=settings)
        print(f"figure: {path}")


def figures_of_files(model, settings: LabelSettings, paths: list, out_dir: str, names,
                     pixel=None) -> None:
    """--figures with --image: the classes are those the classifier finds."""
    for image_path in paths:
        stem = os.path.splitext(os.path.basename(image_path))[0]
        path = os.path.join(out_dir, "figures", stem + ".png")
        image = load_image(image_path)
        check_pixel(pixel, image)
        attention_figure(model, image, path, names, pixel=pixel,
                         settings=settings)
        print(f"figure: {path}")


def pseudo_label_report(model, cfg: Config, settings: LabelSettings, loader, device, names) -> dict:
    """--pseudo: the table on screen, the entries of metrics.json returned."""
    par = PAR(num_iter=cfg.par_iters).to(device)
    result = pseudo_label_quality(model, par, loader, cfg.num_classes, device, settings)
    split = loader.dataset.split
    print(f"\npseudo labels on {split} ({len(loader.dataset)} images), random walk with the "
          f"{'learned affinity' if cfg.propagate_with == 'affinity' else 'MHSA maps'}:\n"
          f"{pseudo_table(result)}")
    return {"pseudo_split": split, "propagate_with": cfg.propagate_with,
            **{f"{k}_miou": result[f"{k}_miou"] for k, _ in PSEUDO_LABELS},
            "pseudo_labelled": result["labelled"],
            "pseudo_IoU": {k: dict(zip(names, v)) for k, v in result["IoU"].items()}}


def segmentation_report(model, cfg: Config, loader, device, names, scales, long_side, crf,
                        workers, save_dir) -> dict:
    """The segmentation table on screen, the entries of metrics.json returned."""
    scores = evaluate_segmentation(model, loader, cfg.num_classes, device, scales, long_side,
                                   crf=crf, workers=workers, save_dir=save_dir)
    split = loader.dataset.split
    print(f"\nsegmentation on {split} ({len(loader.dataset)} images), scales {scales} with "
          f"flips, long side {long_side or 'kept'}, {'with' if crf else 'no'} CRF:\n"
          f"{scores_table(scores, names)}")
    if save_dir:
        print(f"masks in {save_dir} (overlays in {save_dir}/overlay)")
    return {"split": split, "scales": list(scales), "long_side": long_side, "crf": crf,
            "pAcc": scores["pAcc"], "mAcc": scores["mAcc"], "mIoU": scores["mIoU"],
            "IoU": dict(zip(names, scores["IoU"]))}


def run(args: argparse.Namespace) -> dict:
    """Everything the flags ask for; returns the metrics written to <out>/metrics.json."""
    scales = tuple(args.scales)
    if min(scales) <= 0:
        raise ConfigError(f"--scales {' '.join(map(str, scales))}: give positive scales")
    if args.long_side < 0:
        raise ConfigError(f"--long-side {args.long_side}: give a positive size, or 0 to keep it")
    if args.workers < -1 or args.crf_workers < 0:
        raise ConfigError(f"--workers {args.workers} / --crf-workers {args.crf_workers}: give a "
                          "number of processes (0: in this process; --workers -1: one per core)")
    if args.pixel is not None and args.figures is None:
        raise ConfigError("--pixel is for --figures; add --figures")
    device = pick_device(args.device)
    print(device_line(device, 1))
    model, cfg, settings = load_model(args.checkpoint, args, device)
    if args.device == "auto":
        warn_if_no_gpu(cfg.data, device)
    set_cuda_math(device, cfg.tf32, benchmark=False)  # every image has its own size
    out_dir = args.out or os.path.splitext(args.checkpoint)[0] + "_eval"
    os.makedirs(out_dir, exist_ok=True)
    names = class_names_of(cfg.data, cfg.num_classes)
    cache_dir = os.path.join(out_dir, "cache")

    def loader(split, batch_size):
        dataset = load_split(cfg, split, cache_dir)
        return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size or batch_size,
                                           shuffle=False, num_workers=data_workers(args.workers),
                                           pin_memory=device.type == "cuda")

    metrics = {}
    if args.image:
        paths = list_images(args.image)
        folder = os.path.join(out_dir, "predictions")
        predict_images(model, paths, folder, device, scales, args.long_side, crf=args.crf)
        print(f"{len(paths)} prediction(s) in {folder} (masks; overlays in {folder}/overlay)")
        if args.figures is not None:
            figures_of_files(model, settings, paths, out_dir, names, args.pixel)
    elif args.figures is not None:
        dataset = load_split(cfg, args.split or cfg.val_split, cache_dir)
        figures_of_split(model, cfg, settings, dataset, args.figures, out_dir, names, args.pixel)
    if args.pseudo:
        # On train by default, as the paper's tables.
        pseudo_loader = loader(args.split or "train", cfg.val_batch_size)
        metrics.update(pseudo_label_report(model, cfg, settings, pseudo_loader, device, names))
    # The segmentation table is the default task; --save-masks and --crf (without --image) ask for it.
    if (not (args.pseudo or args.image or args.figures is not None) or args.save_masks
            or (args.crf and not args.image)):
        metrics.update(segmentation_report(model, cfg, loader(args.split or cfg.val_split, 1),
                                           device, names, scales, args.long_side, args.crf,
                                           args.crf_workers, args.save_masks))
    if metrics:
        metrics["checkpoint"] = args.checkpoint
        print(f"metrics: {write_metrics(out_dir, metrics)}")
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    return exit_code(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
