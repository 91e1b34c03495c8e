"""Data: PASCAL VOC 2012, COCO 2014 in VOC style, and a built-in synthetic set — one reader.

Every data set is a folder in VOC layout (paper §4.1, "Datasets"): images, index masks (PNG whose
values are class ids, 0 background, 255 ignore) and split lists of image names; a `Layout` says
where its files are. Reading a split takes three steps, each a function of its own:

    read_split          the split's image names: its list file, or every mask of a folder
    image_level_labels  the classes present in each mask (the weak supervision), read once, cached
    augment             the training augmentation (paper §4.1, "Implementation details"): random
                        rescale, random horizontal flip, random crop with black padding and the
                        crop's valid box; `normalize` then applies ImageNet's mean and std

`SegmentationDataset` puts them together: it feeds `train.py` with random crops, their
image-level labels and valid boxes, and `evaluate.py` with full images and their masks.

Details the paper leaves open follow the authors' release: the image is padded with black
*before* normalisation, it sits at a random offset inside the padded canvas, and the crop window is
drawn once, uniformly (the release's classification loader passes no mask, so its "at most 75% one
class" re-draw never runs). The valid box's ends are in crop coordinates; the release's are in
canvas coordinates when the crop starts inside a larger image (they slice the same pixels). The
release ships its split lists and image-level labels as files; here they are read from the data
set and derived once into a cache.

`make_synthetic` writes a small procedurally generated set in the same layout, designed to be
learnable from scratch on a CPU in minutes (no pretrained weights): each class has its own shape,
texture and colour family, 1–3 objects cover 15–35% of the image; backgrounds, of three kinds and
cluttered, are near-neutral around the normalisation mean, so they carry no class signal.

Validation images keep their own size, so batch them one at a time (`batch_size=1`) unless, as
in the synthetic set, all images have the same size. Training crops all have the crop size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

log = logging.getLogger(__name__)

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, on the 0–255 scale (paper §4.1)
IMAGENET_STD = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
SYNTHETIC_CLASSES = ("background", "disc", "square", "triangle", "cross", "ring")


class DatasetError(Exception):
    """A data set on disk that cannot be read as expected; the message names the file and the fix."""


def voc_palette(n: int = 256) -> list[int]:
    """The VOC colour map as a flat [r0, g0, b0, r1, ...] list of 3·n ints (PIL's `putpalette`).

    Colour of id i: the bits of i, taken three at a time (red, green, blue), fill each channel
    from its most significant bit down — 1 → (128, 0, 0), 2 → (0, 128, 0), 255 → (224, 224, 192).
    """
    palette = []
    for index in range(n):
        red = green = blue = 0
        bits = index
        for shift in range(7, -1, -1):
            red |= (bits & 1) << shift
            green |= ((bits >> 1) & 1) << shift
            blue |= ((bits >> 2) & 1) << shift
            bits >>= 3
        palette += [red, green, blue]
    return palette


# =============================================================================================
# Layouts: where a data set keeps its files
# =============================================================================================
@dataclass(frozen=True)
class Layout:
    """Where a data set's files are: patterns relative to its root, formatted with split, name."""

    name: str  # the data set's name, in its caches' file names and its progress lines
    image: str  # e.g. "JPEGImages/{name}.jpg"; its first folder marks a data set root
    mask: str  # index PNG of the same size as the image
    split_list: str = "ImageSets/Segmentation/{split}.txt"  # one image name per line
    root_candidates: tuple[str, ...] = ("",)  # sub-folders of the given root tried in order
    # (split, excluded splits): when the split's list is absent it is every mask in the split's
    # mask folder minus the names in the excluded splits' lists.
    derivable_splits: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # The authors' lists hold only images with a labelled object (COCO: 82,081 of 82,783 train,
    # 40,137 of 40,504 val images): evaluation skips the others too, not only training.
    annotated_only: bool = False
    how_to_get: str = ""  # where the data set comes from, said when its root is not found
    how_to_get_masks: str = ""  # what its masks are and where they come from, when they are absent

    def path(self, root: str, pattern: str, split: str, name: str = "") -> str:
        """`pattern` (one of the fields above) for one split and image name, under `root`."""
        return os.path.join(root, pattern.format(split=split, name=name))


_OR_SYNTHETIC = "; or generate the built-in synthetic set with make_synthetic(root)"
VOC_LAYOUT = Layout(
    name="voc",
    image="JPEGImages/{name}.jpg",
    mask="SegmentationClassAug/{name}.png",
    root_candidates=("", "VOC2012", os.path.join("VOCdevkit", "VOC2012")),
    derivable_splits=(("train_aug", ("val",)),),  # paper §4.1: the 10,582 SBD masks not in val
    how_to_get="Get VOC 2012: http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar, "
    "plus SegmentationClassAug.zip (the SBD-augmented masks) unpacked into VOCdevkit/VOC2012"
    f"{_OR_SYNTHETIC}",
    how_to_get_masks="the SBD-augmented masks (index PNGs of the 10,582 train_aug and 1,449 val "
    "images; VOC's own SegmentationClass holds only 2,913) are missing: get "
    "SegmentationClassAug.zip, the SBD masks in VOC format, widely mirrored (e.g. "
    "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip), and unpack it beside "
    "JPEGImages; VOC 2012 itself is VOCtrainval_11-May-2012.tar from "
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
)
COCO_LAYOUT = Layout(
    name="coco",
    image="JPEGImages/{split}/{name}.jpg",
    mask="SegmentationClass/{split}/{name}.png",
    derivable_splits=(("train", ()), ("val", ())),  # one mask folder per split
    annotated_only=True,
    how_to_get="Get COCO 2014 (train2014.zip, val2014.zip and annotations_trainval2014.zip from "
    "http://images.cocodataset.org/) and convert it: python prepare_coco.py --coco-root <download> "
    "--out <this folder> writes JPEGImages/{train,val} and the masks SegmentationClass/{train,val}"
    f"{_OR_SYNTHETIC}",
    how_to_get_masks="the VOC-style masks are missing: convert COCO 2014's "
    "instances_{train,val}2014.json into index PNGs (ids 0–80, 0 background) in "
    "SegmentationClass/{train,val}: python prepare_coco.py --coco-root <download> --out <this folder>",
)
SYNTHETIC_LAYOUT = Layout(  # VOC's file patterns; its own name for its caches and messages
    name="synthetic",
    image=VOC_LAYOUT.image,
    mask=VOC_LAYOUT.mask,
    how_to_get="Generate it with make_synthetic(root) (train.py does so when --data-root does "
    "not exist)",
    how_to_get_masks="the synthetic set is incomplete: delete the folder and generate it again "
    "with make_synthetic(root) (train.py does so when --data-root does not exist)",
)
DATASETS = {  # name → (layout, class names)
    "voc": (VOC_LAYOUT, VOC_CLASSES),
    "coco": (COCO_LAYOUT, COCO_CLASSES),
    "synthetic": (SYNTHETIC_LAYOUT, SYNTHETIC_CLASSES),
}
_ALIASES = {"voc2012": "voc", "coco2014": "coco"}


def resolve_root(root: str, layout: Layout) -> str:
    """The folder under `root` (itself, or one of the layout's candidates) that holds the images;
    a DatasetError saying what is missing when it holds no images or no masks."""
    marker = layout.image.split("/")[0]
    for candidate in layout.root_candidates:
        folder = os.path.normpath(os.path.join(root, candidate))
        if os.path.isdir(os.path.join(folder, marker)):
            mask_folder = layout.mask.split("/")[0]
            if not os.path.isdir(os.path.join(folder, mask_folder)):
                raise DatasetError(
                    f"{folder} has no {mask_folder} folder: {layout.how_to_get_masks}")
            return folder
    looked = ", ".join(os.path.join(root, c, marker) for c in layout.root_candidates)
    state = "does not exist" if not os.path.exists(root) else f"has no {marker} folder"
    raise DatasetError(
        f"dataset root {root} {state} (looked for {looked}). Expected layout: "
        f"root/{layout.image}, root/{layout.mask}, root/{layout.split_list}. "
        f"{layout.how_to_get}."
    )


# =============================================================================================
# Reading images and masks
# =============================================================================================
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L")  # 16-bit (or 32-bit) grayscale
_INDEX_MASK_MODES = ("P", "L") + _WIDE_GRAY_MODES
_SIXTEEN_BIT_MAX = 65535


def _unreadable(kind: str, path: str, error: Exception) -> DatasetError:
    """One line for a file that cannot be read: missing, not readable, or not decodable."""
    if isinstance(error, FileNotFoundError):
        return DatasetError(f"{kind} {path} is missing (it was there at start-up): extract the "
                            "data set again, or remove its name from the split list")
    if isinstance(error, (PermissionError, IsADirectoryError)):
        return DatasetError(f"cannot read {kind} {path}: {error.strerror}; make it a file readable "
                            "by this user (e.g. chmod a+r)")
    return DatasetError(
        f"cannot decode {kind} {path}: {str(error).rstrip('.')}. The file is corrupt or truncated: "
        "extract it again from the data set's archive, or remove its name from the split list.")


def read_image(path: str) -> np.ndarray:
    """Decode an image of any mode (L, RGBA, CMYK, P, 16-bit, ...) to RGB: (H, W, 3) uint8."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in _WIDE_GRAY_MODES:
                # PIL's own conversion clips 16-bit values at 255; rescale the range instead.
                gray = np.asarray(image, dtype=np.float64) * (255 / _SIXTEEN_BIT_MAX)
                gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)  # (H, W)
                return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W, 3)
            return np.asarray(image.convert("RGB"))
    except _DECODE_ERRORS as error:
        raise _unreadable("image", path, error) from error


def read_mask(path: str) -> np.ndarray:
    """Decode an index mask (palette or grayscale PNG; the values are class ids): (H, W) ints."""
    try:
        with Image.open(path) as mask:
            mask.load()
            mode = mask.mode
            if mode in _INDEX_MASK_MODES:
                return np.asarray(mask)  # for "P" the palette indices are the ids
    except _DECODE_ERRORS as error:
        raise _unreadable("mask", path, error) from error
    raise DatasetError(
        f"mask {path} has mode {mode}: masks must be index masks — a palette ('P') or grayscale "
        f"('L') PNG whose values are class ids (0 background, {IGNORE_INDEX} ignore). A colour-coded "
        f"mask must be converted to ids first (match its colours against data.voc_palette())."
    )


def present_classes(mask: np.ndarray, num_classes: int, ignore_index: int, path: str) -> np.ndarray:
    """Foreground ids in `mask` (0 and ignore excluded); a DatasetError naming `path` on bad ids."""
    ids = np.unique(mask)
    bad = ids[(ids >= num_classes) & (ids != ignore_index)]
    if bad.size:
        raise DatasetError(
            f"mask {path} has class ids {bad.tolist()} outside 0..{num_classes - 1} "
            f"(and {ignore_index} for ignore); is num_classes={num_classes} right for this data "
            f"set (VOC {len(VOC_CLASSES)}, COCO {len(COCO_CLASSES)}, counting background)?"
        )
    return ids[(ids > 0) & (ids != ignore_index)]


def read_sample(image_path: str, mask_path: str, num_classes: int,
                ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """An image and its mask, checked to fit each other: (H, W, 3) uint8, (H, W) int32 ids."""
    image = read_image(image_path)  # (H, W, 3)
    mask = read_mask(mask_path)  # (H, W)
    if mask.shape != image.shape[:2]:
        raise DatasetError(
            f"mask {mask_path} is {mask.shape[1]}×{mask.shape[0]} (W×H) but its image "
            f"{image_path} is {image.shape[1]}×{image.shape[0]}: a mask must label its "
            "image pixel for pixel (is it another image's mask, or was the image resized?)")
    # The cached image-level labels were checked when derived; the mask may have changed since.
    present_classes(mask, num_classes, ignore_index, mask_path)
    return image, mask.astype(np.int32)  # PIL resizes it as mode "I", whatever the PNG held


# =============================================================================================
# Caches: what is derived from a data set is kept outside it, under a hash of its sources
# =============================================================================================
def cache_file(cache_dir: str | None, prefix: str, key: list, extension: str) -> str | None:
    """`cache_dir/prefix-<hash of key>.extension`, or None without a cache folder."""
    if cache_dir is None:
        return None
    digest = hashlib.sha1(json.dumps(key, default=str).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{prefix}-{digest}.{extension}")


def _atomic_write(path: str, write) -> None:
    """Write through `write(file)` to a temporary file beside `path`, then rename it over `path`,
    so that a reader (another process) never sees half a file."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp:
        write(tmp)
    os.replace(tmp.name, path)


# =============================================================================================
# Split lists: which images a split holds
# =============================================================================================
def read_name_list(path: str) -> list[str]:
    """The image names of a split list: the first word of each non-empty line."""
    with open(path) as f:
        names = [line.split()[0] for line in f if line.strip()]
    if not names:
        raise DatasetError(f"split list {path} is empty: it must hold one image name per line")
    return names


def read_split(root: str, layout: Layout, split: str,
               cache_dir: str | None = None) -> tuple[list[str], list]:
    """The split's image names and a cheap fingerprint of where they came from (a cache key).

    From the split's list file; without one, a derivable split (VOC's train_aug, COCO's splits)
    is every mask of its folder minus the names of the excluded splits, cached in `cache_dir`.
    """
    list_path = layout.path(root, layout.split_list, split)
    if os.path.isfile(list_path):
        names = read_name_list(list_path)
        return names, [list_path, len(names), os.stat(list_path).st_mtime_ns]
    derivable = dict(layout.derivable_splits)
    mask_folder = os.path.dirname(layout.path(root, layout.mask, split, "x"))
    if split not in derivable or not os.path.isdir(mask_folder):
        hint = ""
        if split in derivable:
            hint = f" (it is derived from {mask_folder} when that folder exists)"
        folder = os.path.dirname(list_path)
        listed = os.listdir(folder) if os.path.isdir(folder) else []
        available = sorted(f[: -len(".txt")] for f in listed if f.endswith(".txt"))
        raise DatasetError(
            f"split list {list_path} not found{hint}; splits available: {available or 'none'}")

    fingerprint = [mask_folder, os.stat(mask_folder).st_mtime_ns]
    excluded = set()
    for other in derivable[split]:
        other_path = layout.path(root, layout.split_list, other)
        if not os.path.isfile(other_path):
            raise DatasetError(f"split list {list_path} not found, and it cannot be derived "
                               f"without {other_path} (its names are excluded)")
        excluded.update(read_name_list(other_path))
        fingerprint += [other_path, os.stat(other_path).st_mtime_ns]
    key = [os.path.realpath(root), layout, split, fingerprint]
    cached = cache_file(cache_dir, f"{layout.name}-{split}", key, "txt")
    if cached and os.path.isfile(cached):
        return read_name_list(cached), fingerprint
    suffix = os.path.splitext(layout.mask)[1]
    names = sorted(f[: -len(suffix)] for f in os.listdir(mask_folder)
                   if f.endswith(suffix) and f[: -len(suffix)] not in excluded)
    if not names:
        raise DatasetError(f"cannot derive split {split!r}: no mask left in {mask_folder}")
    if cached:
        _atomic_write(cached, lambda f: f.write("".join(n + "\n" for n in names).encode()))
    return names, fingerprint


def check_files_exist(root: str, layout: Layout, split: str, names: list[str]) -> None:
    """A DatasetError naming the first image or mask of the split that is not on disk."""
    for pattern, kind in ((layout.image, "image"), (layout.mask, "mask")):
        paths = (layout.path(root, pattern, split, name) for name in names)
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(
                f"{kind} {missing[0]}{more} listed in split {split!r} is missing: extract "
                "the data set again, or remove the name from the split list")


# =============================================================================================
# Image-level labels: the classes present in each mask, derived once and cached
# =============================================================================================
def image_level_labels(mask_paths: list[str], num_classes: int, ignore_index: int = IGNORE_INDEX,
                       cache: str | None = None, description: str = "image-level labels"
                       ) -> np.ndarray:
    """(n, C−1) uint8 multi-hot: the foreground classes present in each mask.

    The masks are read once (threads: PNG decoding releases the GIL); with `cache`, a file path,
    the result is stored there and read back while it holds the same mask paths.
    """
    if cache and os.path.isfile(cache):
        with np.load(cache) as stored:
            if "paths" in stored and stored["paths"].tolist() == mask_paths:
                return stored["labels"]

    def classes_of(path):
        return present_classes(read_mask(path), num_classes, ignore_index, path)

    labels = np.zeros((len(mask_paths), num_classes - 1), dtype=np.uint8)  # (n, C−1)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        ids_per_mask = pool.map(classes_of, mask_paths)
        progress = tqdm(ids_per_mask, total=len(mask_paths), unit="mask", desc=description)
        for row, ids in enumerate(progress):
            labels[row, ids - 1] = 1  # id k ↔ column k−1 (background has no column)
    if cache:
        _atomic_write(cache, lambda f: np.savez(f, paths=np.asarray(mask_paths), labels=labels))
    return labels


def drop_unannotated(names: list[str], labels: np.ndarray, split: str, root: str,
                     purpose: str) -> tuple[list[str], np.ndarray]:
    """The names and label rows with at least one foreground class; one warning line counts the
    others. `purpose` ends the line ("training")."""
    annotated = labels.any(axis=1)  # (n,)
    if not annotated.all():
        log.warning("%d of %d images of split %r in %s have no foreground class in their mask; "
                    "skipped for %s", (~annotated).sum(), len(names), split, root, purpose)
    if not annotated.any():
        raise DatasetError(
            f"no image of split {split!r} in {root} has a foreground class: every mask holds "
            "only background (0) and ignore; are these the segmentation masks?")
    return [name for name, keep in zip(names, annotated) if keep], labels[annotated]


# =============================================================================================
# Augmentation for training (paper §4.1, as in the authors' release)
# =============================================================================================
def random_rescale(image: np.ndarray, mask: np.ndarray, scale_range: tuple[float, float]):
    """Resize by a factor drawn uniformly from `scale_range`: bilinear image, nearest mask."""
    low, high = scale_range
    scale = low + (high - low) * torch.rand(()).item()
    height, width = mask.shape
    # PIL's (W, H), truncated by int() as in the release
    size = (max(1, int(scale * width)), max(1, int(scale * height)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return image, mask


def random_flip(image: np.ndarray, mask: np.ndarray):
    """Mirror both left to right with probability ½."""
    if torch.rand(()).item() > 0.5:
        return image[:, ::-1], mask[:, ::-1]
    return image, mask


def random_crop(image: np.ndarray, mask: np.ndarray, crop_size: int,
                ignore_index: int = IGNORE_INDEX):
    """A crop_size × crop_size window, the image padded with black (its mask with `ignore_index`)
    where it is smaller: (S, S, 3) uint8, (S, S) ids, and the valid box (top, bottom, left,
    right), ends exclusive, of the image's real pixels in crop coordinates."""
    height, width = mask.shape
    canvas_height, canvas_width = max(crop_size, height), max(crop_size, width)
    # The image sits at a random offset inside a black canvas at least crop × crop ...
    top = int(torch.randint(canvas_height - height + 1, ()))
    left = int(torch.randint(canvas_width - width + 1, ()))
    # ... and the crop window is drawn uniformly inside the canvas.
    crop_top = int(torch.randint(canvas_height - crop_size + 1, ()))
    crop_left = int(torch.randint(canvas_width - crop_size + 1, ()))
    image_canvas = np.zeros((canvas_height, canvas_width, 3), dtype=np.uint8)
    image_canvas[top : top + height, left : left + width] = image
    mask_canvas = np.full((canvas_height, canvas_width), ignore_index, dtype=mask.dtype)
    mask_canvas[top : top + height, left : left + width] = mask
    window = (slice(crop_top, crop_top + crop_size), slice(crop_left, crop_left + crop_size))
    valid_box = (
        max(top - crop_top, 0), min(top + height, crop_top + crop_size) - crop_top,
        max(left - crop_left, 0), min(left + width, crop_left + crop_size) - crop_left,
    )
    return image_canvas[window], mask_canvas[window], valid_box


def augment(image: np.ndarray, mask: np.ndarray, crop_size: int,
            rescale_range: tuple[float, float] = (0.5, 2.0), flip: bool = True,
            ignore_index: int = IGNORE_INDEX):
    """The release's training augmentation: rescale, flip, pad-and-crop.

    image (H, W, 3) uint8 and mask (H, W) ids → (S, S, 3) uint8, (S, S) ids and the valid box.
    The random numbers come from torch's generator, so `torch.manual_seed` and the DataLoader's
    per-worker seeding make it reproducible.
    """
    image, mask = random_rescale(image, mask, rescale_range)
    if flip:
        image, mask = random_flip(image, mask)
    return random_crop(image, mask, crop_size, ignore_index)


def normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32: (x − mean) / std per channel, black → −mean/std."""
    mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    image = (image.astype(np.float32) - mean) / std  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # (3, H, W)


# =============================================================================================
# The data set: the steps above, put together
# =============================================================================================
class SegmentationDataset(torch.utils.data.Dataset):
    """Images of one split with their masks and image-level labels, from a folder in VOC layout.

    Each item is a dict:
      name        str
      image       (3, H, W) float32, normalised with `mean` and `std`
      label       (H, W) int64, the ground-truth mask (augmented with the image; 255 on padding)
      cls_labels  (C−1,) float32, multi-hot over the foreground classes present in the mask
      valid_box   (4,) int64, (top, bottom, left, right), ends exclusive: the image's real pixels

    With `train=True`: `augment` (random rescale by a factor in `rescale_range`, random
    horizontal flip, random crop_size × crop_size crop with black padding); images without any
    foreground class are skipped. With `train=False`: the full image, unaugmented, every image
    of the split (batch size 1 when sizes differ), except, where `layout.annotated_only` (COCO),
    images without foreground as well. Either skip is counted in one warning line.

    Image-level labels are derived from the masks once and cached in `cache_dir` (nothing is
    ever written into the data set folder); with `cache_dir=None` they are kept in memory only.
    """

    def __init__(
        self,
        *,
        root: str,
        split: str,
        num_classes: int,
        train: bool,
        layout: Layout = VOC_LAYOUT,
        crop_size: int = 512,
        rescale_range: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        ignore_index: int = IGNORE_INDEX,
        cache_dir: str | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ):
        if num_classes < 2:
            raise ValueError(
                f"num_classes must count background and at least one class, got {num_classes}")
        if crop_size < 1:
            raise ValueError(f"crop_size must be a positive number of pixels, got {crop_size}")
        if not 0 < rescale_range[0] <= rescale_range[1]:
            raise ValueError(
                f"rescale_range must be (low, high) with 0 < low <= high, got {rescale_range}")
        self.root = resolve_root(root, layout)
        self.split, self.num_classes, self.layout, self.train = split, num_classes, layout, train
        self.crop_size, self.rescale_range, self.flip = crop_size, tuple(rescale_range), flip
        self.ignore_index, self.mean, self.std = ignore_index, mean, std

        names, fingerprint = read_split(self.root, layout, split, cache_dir)
        check_files_exist(self.root, layout, split, names)
        key = [os.path.realpath(self.root), layout, split, num_classes, ignore_index, fingerprint]
        labels = image_level_labels(  # (n, C−1)
            [self.mask_path(name) for name in names], num_classes, ignore_index,
            cache=cache_file(cache_dir, f"{layout.name}-{split}", key, "npz"),
            description=f"image-level labels of {layout.name} {split}")
        if train or layout.annotated_only:  # training never learns from a mask without objects
            purpose = "training" if train else (
                "evaluation too, as the authors' lists of this data set hold only annotated images")
            names, labels = drop_unannotated(names, labels, split, self.root, purpose)
        self.names = names
        self.cls_labels = labels.astype(np.float32)  # (n, C−1)

    def image_path(self, name: str) -> str:
        return self.layout.path(self.root, self.layout.image, self.split, name)

    def mask_path(self, name: str) -> str:
        return self.layout.path(self.root, self.layout.mask, self.split, name)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        image, mask = read_sample(self.image_path(name), self.mask_path(name), self.num_classes,
                                  self.ignore_index)  # (H, W, 3), (H, W)
        if self.train:
            image, mask, valid_box = augment(image, mask, self.crop_size, self.rescale_range,
                                             self.flip, self.ignore_index)
        else:
            valid_box = (0, mask.shape[0], 0, mask.shape[1])
        return {
            "name": name,
            "image": normalize(image, self.mean, self.std),  # (3, H, W)
            "label": torch.from_numpy(mask.astype(np.int64)),  # (H, W)
            "cls_labels": torch.from_numpy(self.cls_labels[index].copy()),  # (C−1,)
            "valid_box": torch.tensor(valid_box, dtype=torch.int64),  # (4,)
        }


def build_dataset(name: str, root: str, split: str, **kwargs) -> SegmentationDataset:
    """`SegmentationDataset` for "voc" (alias "VOC2012"), "coco" ("COCO", "coco2014") or
    "synthetic": the layout and `num_classes` come from the name; `kwargs` go to the reader.
    The synthetic set must exist first: `make_synthetic(root)`."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        names = sorted(DATASETS) + sorted(_ALIASES)
        raise ValueError(f"name must be one of {names} (any case), got {name!r}")
    layout, class_names = DATASETS[key]
    kwargs.setdefault("num_classes", len(class_names))
    return SegmentationDataset(root=root, split=split, layout=layout, **kwargs)


# =============================================================================================
# The built-in synthetic data set
# =============================================================================================
SYNTHETIC_VERSION = 2  # bump whenever the generator's output changes: existing sets regenerate
SYNTHETIC_FOREGROUND_FRACTION = (0.15, 0.35)  # share of labelled object pixels per image
_SYNTHETIC_MARKER = "synthetic.json"
# Colours live around the normalisation mean (IMAGENET_MEAN): a colour is that mean, plus a
# luminance offset (equal in R, G, B), plus a chroma vector in the plane orthogonal to grey. The
# normalised image is then ≈ (luminance, chroma) / std. Backgrounds have small chroma in any
# direction; each class has a large chroma at its own angle, the five angles 72° apart, so every
# class colour lies equally far from every background. (With backgrounds at neutral grey instead,
# normalisation turns grey into a blue-leaning colour, and the class owning blue is learned as
# "no other class here" and fires on the background.)
_CLASS_ANGLES = (0.0, 72.0, 144.0, 216.0, 288.0)  # chroma angle of each class, degrees
_CLASS_ANGLE_JITTER = 12.0  # ± degrees around it, per object
_CLASS_CHROMA = (60.0, 90.0)  # chroma radius of an object's colour, 0–255 scale
_BACKGROUND_CHROMA = 14.0  # at most this in backgrounds and their clutter, any angle
_BACKGROUND_KINDS = 3  # smooth noise; flat tiles; a two-region "horizon" (all with clutter)
_TRIANGLE_AREA = 3 * math.sqrt(3) / 4  # equilateral, circumradius 1
_CROSS_THICKNESS = 0.33  # arm half-width / arm half-length
_RING_HOLE = 0.5  # inner radius / outer radius
# Area of each shape at scale r, in units of r² (aspect ratios keep it).
_SHAPE_AREA = (math.pi, 4.0, _TRIANGLE_AREA,
               8 * _CROSS_THICKNESS - 4 * _CROSS_THICKNESS**2, math.pi * (1 - _RING_HOLE**2))
_MAX_OVERLAP = 0.15  # share of a new object's area that may overlap the objects before it
_VOID_INSIDE, _VOID_OUTSIDE = 1, 1  # the 255 band around each object, pixels inside / outside
_RING_SECTORS = 10
_MAX_LAYOUTS = 100  # layouts drawn per image before giving up (a handful suffice from 64 pixels up)
# An orthonormal basis of the chroma plane (orthogonal to grey (1, 1, 1)) in RGB.
_CHROMA_BASIS = np.array([[2, -1, -1], [0, 1, -1]], dtype=np.float64) / np.array(
    [[math.sqrt(6)], [math.sqrt(2)]])


def _colour(luminance, chroma: float, angle_degrees: float) -> np.ndarray:
    """IMAGENET_MEAN + luminance (scalar or (..., 1)) + chroma at an angle: (..., 3), 0–255 scale."""
    angle = math.radians(angle_degrees)
    direction = math.cos(angle) * _CHROMA_BASIS[0] + math.sin(angle) * _CHROMA_BASIS[1]  # (3,)
    return np.asarray(IMAGENET_MEAN) + luminance + chroma * direction


def chroma_angle(rgb: np.ndarray) -> np.ndarray:
    """Inverse of `_colour`'s angle: (..., 3) RGB → (...,) degrees in [0, 360)."""
    centred = np.asarray(rgb, dtype=np.float64) - np.asarray(IMAGENET_MEAN)
    return np.degrees(np.arctan2(centred @ _CHROMA_BASIS[1], centred @ _CHROMA_BASIS[0])) % 360


def _shape(kind: int, u: np.ndarray, v: np.ndarray, r: float, aspect: float) -> np.ndarray:
    """Inside of shape `kind` (1..5) of scale r in object coordinates (u, v): (S, S) bool."""
    if kind == 1:  # disc: an ellipse of area π r²
        return (u / (r * aspect)) ** 2 + (v * aspect / r) ** 2 <= 1
    if kind == 2:  # square: a rectangle of area 4 r²
        return (np.abs(u) <= r * aspect) & (np.abs(v) <= r / aspect)
    if kind == 3:  # triangle: equilateral, circumradius r, so each edge lies r/2 from the centre
        normals = (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)  # outward, one per edge
        edges = [u * math.cos(a) + v * math.sin(a) <= r / 2 for a in normals]
        return edges[0] & edges[1] & edges[2]
    if kind == 4:  # cross: two bars of half-length r, half-width t
        t = _CROSS_THICKNESS * r
        return ((np.abs(u) <= r) & (np.abs(v) <= t)) | ((np.abs(u) <= t) & (np.abs(v) <= r))
    rho = np.hypot(u, v)  # ring: an annulus
    return (rho <= r) & (rho >= _RING_HOLE * r)


def _texture(kind: int, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Two-tone texture of class `kind` in object coordinates: (S, S) bool."""
    if kind == 1:  # dots
        du, dv = u % period - period / 2, v % period - period / 2
        return du**2 + dv**2 <= (0.3 * period) ** 2
    if kind == 2:  # checkerboard
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if kind == 3:  # stripes, half a period wide
        return np.floor(2 * u / period) % 2 == 0
    if kind == 4:  # grid of thin lines
        return (u % period < 0.3 * period) | (v % period < 0.3 * period)
    return np.floor(np.arctan2(v, u) / (2 * math.pi / _RING_SECTORS)) % 2 == 0  # ring: sectors


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation by a 3×3 square, `steps` times (pixels beyond the border count as empty)."""
    height, width = mask.shape
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                mask |= padded[dy : dy + height, dx : dx + width]
    return mask


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-scale noise varying over about size/cells pixels: a random grid, upsampled bicubic."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC))  # (S, S)


def _background_colour(rng: np.random.Generator, luminance: float) -> np.ndarray:
    """A near-neutral colour (chroma ≤ _BACKGROUND_CHROMA, any angle): (3,) on the 0–255 scale."""
    return _colour(luminance, rng.uniform(0, _BACKGROUND_CHROMA), rng.uniform(0, 360))


def _synthetic_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A near-neutral background of one of three kinds, with neutral clutter: (S, S, 3) float.

    No class colour (chroma below every object's) and no class texture (no periodic pattern); the
    kind is drawn independently of the objects, so every class meets every kind.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres, (S, S) each
    kind, luminance = int(rng.integers(_BACKGROUND_KINDS)), rng.uniform(-50, 50)
    if kind == 0:  # smooth noise
        shading = 25 * _smooth_noise(rng, size, 4) + 12 * _smooth_noise(rng, size, 10)  # (S, S)
        background = _background_colour(rng, luminance) + shading[:, :, None]
    elif kind == 1:  # flat tiles: each pixel takes the tone of its nearest of a few random seeds
        seeds = rng.uniform(0, size, (int(rng.integers(4, 10)), 2))  # (K, 2) as (y, x)
        nearest = np.argmin((y[..., None] - seeds[:, 0]) ** 2 + (x[..., None] - seeds[:, 1]) ** 2,
                            axis=-1)  # (S, S) seed index
        tones = np.stack([_background_colour(rng, luminance + rng.uniform(-30, 30))
                          for _ in seeds])  # (K, 3)
        background = tones[nearest] + 6 * _smooth_noise(rng, size, 8)[:, :, None]
    else:  # a horizon: two regions split by a slanted line, with a vertical gradient
        angle, offset = rng.uniform(-0.4, 0.4), rng.uniform(-0.2, 0.2) * size
        upper = (y - size / 2) < (x - size / 2) * math.tan(angle) + offset  # (S, S) bool
        step = rng.choice([-1, 1]) * rng.uniform(15, 40)
        gradient = rng.uniform(-30, 30) * (y / size - 0.5)  # (S, S)
        background = np.where(upper[:, :, None], _background_colour(rng, luminance),
                              _background_colour(rng, luminance + step))
        background = background + (gradient + 8 * _smooth_noise(rng, size, 6))[:, :, None]
    background = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))  # (S, S, 3)
    draw = ImageDraw.Draw(background)

    def clutter_colour():
        tone = _background_colour(rng, luminance + rng.uniform(-45, 45))
        return tuple(int(c) for c in np.clip(tone, 0, 255))

    for _ in range(rng.integers(2, 6)):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line((x0, y0, x1, y1), fill=clutter_colour(), width=int(rng.integers(1, 4)))
    for _ in range(rng.integers(1, 5)):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.04, 0.15, 2) * size
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=clutter_colour())
    return np.asarray(background, dtype=np.float32)


def _synthetic_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (S, S, 3) uint8 with 1–3 objects and its mask (S, S) uint8 (ids, 255 void)."""
    image = _synthetic_background(rng, size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres, (S, S) each
    low, high = SYNTHETIC_FOREGROUND_FRACTION
    for _ in range(_MAX_LAYOUTS):  # redraw the layout until the labelled share is in range
        num_objects = int(rng.integers(1, 4))
        kinds = rng.choice(len(_CLASS_ANGLES), num_objects, replace=False) + 1
        # Aim a little high: the void band takes the objects' outermost pixels.
        shares = rng.uniform(0.6, 1.4, num_objects)
        areas = rng.uniform(low + 0.03, high + 0.03) * size**2 * shares / shares.sum()
        objects, union = [], np.zeros((size, size), dtype=bool)
        for kind, area in zip(kinds, areas):
            r = math.sqrt(area / _SHAPE_AREA[kind - 1])
            for _ in range(30):  # placements tried before the object is dropped
                margin = min(r, size / 2)  # a large triangle's corners may leave the image
                cy, cx = rng.uniform(margin, size - margin, 2)
                theta, aspect = rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.25)
                u = math.cos(theta) * (x - cx) + math.sin(theta) * (y - cy)  # object frame
                v = -math.sin(theta) * (x - cx) + math.cos(theta) * (y - cy)
                inside = _shape(kind, u, v, r, aspect)
                if (inside & union).sum() <= _MAX_OVERLAP * inside.sum():
                    objects.append((kind, u, v, r, inside))
                    union |= inside
                    break
        label = np.zeros((size, size), dtype=np.uint8)
        for kind, _, _, _, inside in objects:  # later objects lie on top
            core = ~_grow(~inside, _VOID_INSIDE)
            label[_grow(inside, _VOID_OUTSIDE) & ~core] = IGNORE_INDEX
            label[core] = kind
        foreground = ((label > 0) & (label != IGNORE_INDEX)).mean()
        if low <= foreground <= high:
            break
    else:
        raise ValueError(
            f"size {size} is too small for objects covering {low:.0%}–{high:.0%} of the image")

    for kind, u, v, r, inside in objects:
        angle = _CLASS_ANGLES[kind - 1] + rng.uniform(-_CLASS_ANGLE_JITTER, _CLASS_ANGLE_JITTER)
        luminance, chroma = rng.uniform(-30, 30), rng.uniform(*_CLASS_CHROMA)
        primary = _colour(luminance, chroma, angle)
        secondary = _colour(luminance - rng.uniform(35, 60), chroma * 0.7, angle)  # darker tone
        period = rng.uniform(0.06, 0.1) * size
        phase = rng.uniform(0, period, 2)
        pattern = _texture(kind, u + phase[0], v + phase[1], period)
        # Shading across the object (brighter on one side), so its interior is not one colour.
        direction, strength = rng.uniform(0, 2 * math.pi), rng.uniform(15, 35)
        shading = strength * (u * math.cos(direction) + v * math.sin(direction)) / r  # (S, S)
        colour = np.where(pattern[:, :, None], primary, secondary) + shading[:, :, None]
        image[inside] = colour[inside]
    image += rng.normal(0, 3, image.shape)  # sensor-like noise, so no region is perfectly flat
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def make_synthetic(root: str, num_train: int = 800, num_val: int = 100, size: int = 128,
                   seed: int = 0) -> str:
    """Write the synthetic set into `root` in VOC layout (a few seconds); return `root`.

    Images `JPEGImages/syn_000123.jpg` (square, `size` pixels, JPEG quality 95), palette masks in
    `SegmentationClassAug`, lists train / val / train_aug (= train) in `ImageSets/Segmentation`.
    Image i is drawn from its own generator seeded with (seed, i): the same arguments give the same
    bytes. A marker file records the arguments; called again with the same ones it does nothing,
    with others it regenerates.
    """
    parameters = {"version": SYNTHETIC_VERSION, "num_train": num_train, "num_val": num_val,
                  "size": size, "seed": seed}
    marker = os.path.join(root, _SYNTHETIC_MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == parameters:
                return root
        os.remove(marker)  # a half-finished regeneration must not pass as complete

    image_dir = os.path.join(root, "JPEGImages")
    mask_dir = os.path.join(root, "SegmentationClassAug")
    list_dir = os.path.join(root, "ImageSets", "Segmentation")
    for folder in (image_dir, mask_dir, list_dir):
        os.makedirs(folder, exist_ok=True)
    for folder in (image_dir, mask_dir):  # files of an earlier generation with other arguments
        for file in os.listdir(folder):
            if file.startswith("syn_"):
                os.remove(os.path.join(folder, file))

    palette = voc_palette()
    names = [f"syn_{index:06d}" for index in range(num_train + num_val)]
    for index, name in enumerate(tqdm(names, desc="synthetic data set", unit="image")):
        image, label = _synthetic_sample(np.random.default_rng([seed, index]), size)
        Image.fromarray(image).save(os.path.join(image_dir, name + ".jpg"), quality=95)
        mask = Image.fromarray(label)
        mask.putpalette(palette)  # "L" → "P": the stored indices stay the class ids
        mask.save(os.path.join(mask_dir, name + ".png"))
    for split, split_names in (("train", names[:num_train]), ("train_aug", names[:num_train]),
                               ("val", names[num_train:])):
        with open(os.path.join(list_dir, split + ".txt"), "w") as f:
            f.write("".join(n + "\n" for n in split_names))
    with open(marker, "w") as f:  # written last: its presence means the set is complete
        json.dump(parameters, f)
    return root
