"""Scores: the mIoU of PASCAL VOC, the classifier's F1, and the validation run during training.

The metric is the standard one (paper §4.1): a C × C confusion matrix accumulated over the whole
split (pixels labelled 255 are ignored), IoU_c = TP / (TP + FP + FN) per class, and mIoU the mean
over the classes that occur in the ground truth. `validate` scores the four outputs the release
logs while training — the classifier, the CAM label, the affinity-propagated CAM and the seg
branch — with labels made as the release's validation makes them; `evaluate.py` builds its tables
on the same functions. Scores are fractions in [0, 1] where they are stored (`metrics.json`)
and percent, one decimal, where they are printed (`format_metrics`, `metrics_table`, the tables
of `evaluate.py` and `ablation.py`), as the paper writes them.

The authors' release differs in one score: its classifier F1 is the mean over images of each
image's F1; here it is micro-averaged over all images and classes (one number that does not
depend on how the split is batched or sharded).
"""
from __future__ import annotations

import math

import torch

from data import IGNORE_INDEX
from pipeline import LabelSettings, make_pseudo_labels, upsample


# =============================================================================================
# The metric
# =============================================================================================
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Confusion matrix (C, C) int64, rows = ground truth, columns = prediction.

    pred, target: integer tensors of the same shape (any), class ids in [0, C). Pixels whose
    target is `ignore_index` (or outside [0, C)) are skipped, and so are pixels the prediction
    marks `ignore_index`: a pseudo label's ignore band is scored on the pixels it does label, as
    in the release's `pseudo_scores`.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes) & (pred != ignore_index)
    index = target[keep] * num_classes + pred[keep]                 # row-major (gt, pred)
    counts = torch.bincount(index, minlength=num_classes ** 2)
    if counts.numel() != num_classes ** 2 or (index.numel() and int(index.min()) < 0):
        raise ValueError(f"pred has class ids outside [0, {num_classes}) other than {ignore_index}")
    return counts.reshape(num_classes, num_classes)


def segmentation_scores(conf: torch.Tensor) -> dict:
    """pAcc, mAcc, mIoU and per-class IoU from a confusion matrix (C, C).

    Classes that never occur in the ground truth are left out of the means (their IoU is NaN),
    as in the authors' release.
    """
    conf = conf.double()
    tp = conf.diag()
    gt_count = conf.sum(1)                                   # TP + FN
    pred_count = conf.sum(0)                                 # TP + FP
    present = gt_count > 0
    iou = tp / (gt_count + pred_count - tp)                  # NaN where the class is nowhere
    acc = tp / gt_count
    total = conf.sum()
    return {
        "pAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mAcc": float(acc[present].mean()) if present.any() else float("nan"),
        "mIoU": float(iou[present].mean()) if present.any() else float("nan"),
        "IoU": [float(v) if p else float("nan") for v, p in zip(iou.tolist(), present.tolist())],
    }


def multilabel_counts(logits: torch.Tensor, cls_labels: torch.Tensor) -> torch.Tensor:
    """(tp, fp, fn) counts (3,) int64 of the classifier's decision logit > 0 against the labels."""
    pred = logits > 0
    truth = cls_labels > 0.5
    return torch.stack([(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()])


def f1_from_counts(counts: torch.Tensor) -> float:
    """Micro-averaged F1 = 2 TP / (2 TP + FP + FN) over all images and classes."""
    tp, fp, fn = (float(c) for c in counts)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 1.0


def scores_table(scores: dict, class_names) -> str:
    """Markdown table of the per-class IoU (in %) and the three means."""
    lines = ["| class | IoU |", "|---|---|"]
    lines += [f"| {name} | {'—' if math.isnan(v) else f'{100 * v:.1f}'} |"
              for name, v in zip(class_names, scores["IoU"])]
    lines += [f"| **mIoU** | **{100 * scores['mIoU']:.1f}** |",
              f"\npAcc {100 * scores['pAcc']:.1f}, mAcc {100 * scores['mAcc']:.1f}, "
              f"mIoU {100 * scores['mIoU']:.1f}"]
    return "\n".join(lines)


# =============================================================================================
# Validation during training: classifier F1, CAM, AFA-propagated CAM and seg mIoU
# =============================================================================================
@torch.no_grad()
def validation_labels(model, images: torch.Tensor, cls_labels: torch.Tensor,
                      settings: LabelSettings) -> tuple:
    """(cls_logits (B, C-1), {"cam", "walk", "seg": (B, H, W) labels}) of images (B, 3, H, W), as
    the release's validation makes them, with the model in eval mode.

    "cam": the multi-scale CAM's label at the evaluation threshold `bkg_score`; "walk": the arg-max
    of those CAMs propagated with the affinity of the eval forward at scale 1.0 (on its
    ⌈H/16⌉ × ⌈W/16⌉ grid) with background `low`, no PAR — or, with `propagate_with="attention"`,
    with the MHSA maps of the same blocks on that grid (attention_affinity.mhsa_affinity; paper
    Table 4); "seg": the arg-max of the seg branch. The ground-truth image-level labels select the classes.
    """
    H, W = images.shape[-2:]
    out = model(images)                                                    # scale 1.0, eval mode
    seg = upsample(out.seg_logits, (H, W)).argmax(1)                       # (B, H, W)
    labels = make_pseudo_labels(model, None, {"image": images, "cls_labels": cls_labels},
                                settings.for_evaluation(affinity_from="forward"),
                                need=("cam", "walk"), forward=out)
    return out.cls_logits, {"cam": labels.cam, "walk": labels.walk, "seg": seg}


@torch.no_grad()
def validate(model, loader, num_classes: int, device, settings: LabelSettings,
             world: int = 1) -> dict:
    """Scores of `validation_labels` on a (sharded) split; counts summed over the processes.

    Returns {"cls_f1", "cam_miou", "walk_miou", "seg_miou"}.
    """
    confs = {k: torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
             for k in ("cam", "walk", "seg")}
    counts = torch.zeros(3, dtype=torch.int64, device=device)
    for batch in loader:
        images = batch["image"].to(device)                                    # (B, 3, H, W)
        gt = batch["label"].to(device)                                        # (B, H, W)
        cls_labels = batch["cls_labels"].to(device)                           # (B, C-1)
        cls_logits, labels = validation_labels(model, images, cls_labels, settings)
        counts += multilabel_counts(cls_logits, cls_labels)
        for key, pred in labels.items():
            confs[key] += confusion_matrix(pred, gt, num_classes)
    if world > 1:
        for t in (*confs.values(), counts):
            torch.distributed.all_reduce(t)
    return {"cls_f1": f1_from_counts(counts.cpu()),
            **{f"{k}_miou": segmentation_scores(c.cpu())["mIoU"] for k, c in confs.items()}}


METRIC_COLUMNS = (("cls_f1", "cls F1"), ("cam_miou", "cam mIoU"), ("walk_miou", "walk mIoU"),
                  ("seg_miou", "seg mIoU"))


def percent(value: float) -> str:
    """A score in [0, 1] as the paper writes it: percent, one decimal ("81.0")."""
    return f"{100 * value:.1f}"


def format_metrics(m: dict) -> str:
    """One validation as one line, in percent: "iter 600: cls F1 100.0, cam mIoU 57.8, ..."."""
    return f"iter {m['step']}: " + ", ".join(f"{name} {percent(m[k])}" for k, name in METRIC_COLUMNS)


def metrics_table(history: list) -> str:
    """Every validation of a run as a Markdown table in percent, one row per validation."""
    header = "| iteration | " + " | ".join(name for _, name in METRIC_COLUMNS) + " |"
    rule = "|---" * (len(METRIC_COLUMNS) + 1) + "|"
    rows = [f"| {m['step']} | " + " | ".join(percent(m[k]) for k, _ in METRIC_COLUMNS) + " |"
            for m in history]
    return "\n".join(["validation (%):", header, rule, *rows])
