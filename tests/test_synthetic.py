"""Pins synthetic.py: same seed → same bytes, balanced classes in their colours, mute backgrounds."""

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import synthetic


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_synthetic_reproducible_idempotent_and_as_designed(tmp_path, monkeypatch):
    first, second = tmp_path / "one", tmp_path / "two"
    synthetic.make_synthetic(str(first), num_train=16, num_val=4, seed=5)
    synthetic.make_synthetic(str(second), num_train=16, num_val=4, seed=5)
    assert files_under(first) == files_under(second)
    for f in files_under(first):  # same seed → the same bytes
        assert (first / f).read_bytes() == (second / f).read_bytes(), f
    lists = first / "ImageSets" / "Segmentation"
    train, val = (lists / "train.txt").read_text().split(), (lists / "val.txt").read_text().split()
    assert len(train) == 16 and len(val) == 4 and not set(train) & set(val)
    assert (lists / "train_aug.txt").read_text().split() == train
    assert train[0] == "syn_000000"

    low, high = synthetic.SYNTHETIC_FOREGROUND_FRACTION
    angles = {k: [] for k in range(1, 6)}
    for name in train + val:
        image = Image.open(first / "JPEGImages" / (name + ".jpg"))
        mask = Image.open(first / "SegmentationClassAug" / (name + ".png"))
        assert image.size == (128, 128) and image.mode == "RGB" and mask.mode == "P"
        ids = np.asarray(mask)
        present = set(np.unique(ids).tolist())
        assert present <= {0, 1, 2, 3, 4, 5, 255} and 255 in present and len(present - {0, 255}) >= 1
        assert low <= ((ids > 0) & (ids < 255)).mean() <= high
        rgb = np.asarray(image, dtype=np.float64)
        for k in present - {0, 255}:
            angles[k].append(np.median(synthetic.chroma_angle(rgb[ids == k])))
    # Each class keeps to its colour family: its chroma angle ± the jitter (JPEG-tolerant).
    for k, centre in enumerate(synthetic._CLASS_ANGLES, start=1):
        assert angles[k], f"class {k} never drawn"
        off = (np.asarray(angles[k]) - centre + 180) % 360 - 180  # degrees from the class's angle
        assert (np.abs(off) < synthetic._CLASS_ANGLE_JITTER + 8).all(), (k, angles[k])

    # Idempotent: the same call again does nothing ...
    def no_drawing(rng, size):
        raise AssertionError("regenerated")

    stamp = os.stat(first / "JPEGImages" / "syn_000000.jpg").st_mtime_ns
    monkeypatch.setattr(synthetic, "_synthetic_sample", no_drawing)
    synthetic.make_synthetic(str(first), num_train=16, num_val=4, seed=5)
    assert os.stat(first / "JPEGImages" / "syn_000000.jpg").st_mtime_ns == stamp
    # ... other arguments regenerate, without stale files of the earlier set.
    monkeypatch.undo()
    synthetic.make_synthetic(str(first), num_train=5, num_val=2, size=96, seed=6)
    assert len(os.listdir(first / "JPEGImages")) == 7 and len(os.listdir(first / "SegmentationClassAug")) == 7
    assert Image.open(first / "JPEGImages" / "syn_000006.jpg").size == (96, 96)

    ds = data.build_dataset("synthetic", str(first), "train", train=True, crop_size=64,
                            rescale_range=(0.75, 1.5), cache_dir=str(tmp_path / "cache"))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["image"].shape == (5, 3, 64, 64) and batch["cls_labels"].shape == (5, 5)
    assert batch["valid_box"].shape == (5, 4) and (batch["cls_labels"].sum(1) >= 1).all()


def synthetic_samples(count: int, seed: int = 123):
    """(image (128, 128, 3) uint8, mask (128, 128)) pairs straight from the generator."""
    return [synthetic._synthetic_sample(np.random.default_rng([seed, i]), 128) for i in range(count)]


def classes_present(samples) -> np.ndarray:
    """(N, 5) bool: which foreground classes each sample's mask holds."""
    return np.array([[(mask == k).any() for k in range(1, 6)] for _, mask in samples])


def test_synthetic_classes_balanced():
    """Each class is in about 2/5 of the images (1–3 distinct classes of 5 per image) and holds
    about a fifth of the object pixels."""
    samples = synthetic_samples(300)
    present = classes_present(samples)
    pixels = np.array([[(mask == k).sum() for k in range(1, 6)] for _, mask in samples])
    assert (np.abs(present.mean(0) - 0.4) < 0.07).all(), present.mean(0)
    share = pixels.sum(0) / pixels.sum()
    assert (np.abs(share - 0.2) < 0.06).all(), share


def colour_statistics(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Features of the pixels of `region` (H, W) bool: luminance mean and spread, mean chroma
    (2 numbers and its length), a chroma-angle histogram (12 bins, weighted by chroma length),
    mean absolute horizontal and vertical gradients (texture)."""
    normalised = (image - np.asarray(data.IMAGENET_MEAN)) / np.asarray(data.IMAGENET_STD)
    luminance = normalised.mean(-1)                                           # (H, W)
    chroma = normalised @ synthetic._CHROMA_BASIS.T                           # (H, W, 2)
    length, angle = np.hypot(*np.moveaxis(chroma, -1, 0)), np.arctan2(chroma[..., 1], chroma[..., 0])
    bins = ((angle + np.pi) / (2 * np.pi) * 12).astype(int) % 12
    histogram = np.bincount(bins[region], weights=length[region], minlength=12) / region.sum()
    dx = np.abs(np.diff(luminance, axis=1))[region[:, 1:] & region[:, :-1]]
    dy = np.abs(np.diff(luminance, axis=0))[region[1:] & region[:-1]]
    return np.concatenate([[luminance[region].mean(), luminance[region].std(),
                            length[region].mean(), dx.mean(), dy.mean()],
                           chroma[region].mean(0), histogram])


def held_out_auc(features: np.ndarray, labels: np.ndarray, train: int) -> np.ndarray:
    """Per class, the ROC AUC on images [train:] of a logistic regression fitted on [:train]."""
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-9
    x = torch.tensor((features - mean) / std)                                 # (N, F)
    y = torch.tensor(labels, dtype=torch.float64)                             # (N, 5)
    weight = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def loss():
        optimizer.zero_grad()
        value = F.binary_cross_entropy_with_logits(x[:train] @ weight + bias, y[:train]) \
            + 1e-3 * weight.square().sum()
        value.backward()
        return value
    optimizer.step(loss)
    scores = (x[train:] @ weight + bias).detach().numpy()                     # (M, 5)
    aucs = []
    for k in range(y.shape[1]):
        truth = labels[train:, k]
        ranks = scores[:, k].argsort().argsort() + 1
        positives, negatives = truth.sum(), len(truth) - truth.sum()
        aucs.append((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))
    return np.array(aucs)


def test_synthetic_backgrounds_carry_no_class_signal():
    """A classifier that sees only background pixels (3 px away from every object) predicts the
    image's classes at chance; the same classifier on the object pixels is near perfect."""
    samples = synthetic_samples(450)
    labels = classes_present(samples)
    background = [(mask == 0) & ~synthetic._grow(mask != 0, 3) for _, mask in samples]
    objects = [(mask > 0) & (mask != data.IGNORE_INDEX) for _, mask in samples]
    on_background = np.stack([colour_statistics(image.astype(np.float64), region)
                              for (image, _), region in zip(samples, background)])
    on_objects = np.stack([colour_statistics(image.astype(np.float64), region)
                           for (image, _), region in zip(samples, objects)])
    chance = held_out_auc(on_background, labels, train=300)
    assert (np.abs(chance - 0.5) < 0.15).all(), chance
    assert (held_out_auc(on_objects, labels, train=300) > 0.95).all()
