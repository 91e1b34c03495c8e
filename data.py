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

The built-in synthetic set is read the same way; `synthetic.py` writes it (`make_synthetic`).

Validation images keep their own size, so batch them one at a time (`batch_size=1`) unless, as
in the synthetic set, all images have the same size. Training crops all have the crop size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
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

    name: str  # the data set's name, in its caches' file names, its messages and DOWNLOAD_HELP
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

    def path(self, root: str, pattern: str, split: str, name: str = "") -> str:
        """`pattern` (one of the fields above) for one split and image name, under `root`."""
        return os.path.join(root, pattern.format(split=split, name=name))


VOC_LAYOUT = Layout(
    name="voc",
    image="JPEGImages/{name}.jpg",
    mask="SegmentationClassAug/{name}.png",
    root_candidates=("", "VOC2012", os.path.join("VOCdevkit", "VOC2012")),
    derivable_splits=(("train_aug", ("val",)),),  # paper §4.1: the 10,582 SBD masks not in val
)
COCO_LAYOUT = Layout(
    name="coco",
    image="JPEGImages/{split}/{name}.jpg",
    mask="SegmentationClass/{split}/{name}.png",
    derivable_splits=(("train", ()), ("val", ())),  # one mask folder per split
    annotated_only=True,
)
SYNTHETIC_LAYOUT = Layout(  # VOC's file patterns; its own name for its caches and messages
    name="synthetic",
    image=VOC_LAYOUT.image,
    mask=VOC_LAYOUT.mask,
)
DATASETS = {  # name → (layout, class names)
    "voc": (VOC_LAYOUT, VOC_CLASSES),
    "coco": (COCO_LAYOUT, COCO_CLASSES),
    "synthetic": (SYNTHETIC_LAYOUT, SYNTHETIC_CLASSES),
}
_ALIASES = {"voc2012": "voc", "coco2014": "coco"}


# =============================================================================================
# Where a data set comes from: the help its "not found" errors give
# =============================================================================================
class DownloadHelp(NamedTuple):
    root: str  # where the data set comes from, said when its root is not found
    masks: str  # what its masks are and where they come from, said when they are absent


_OR_SYNTHETIC = "; or generate the built-in synthetic set with make_synthetic(root)"
_VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
_VOC_TAR = "VOCtrainval_11-May-2012.tar"
_SBD_MASKS_URL = "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip"
_PREPARE_COCO = ("python prepare_coco.py --coco-root <download> --out <this folder> (after "
                 "pip install pycocotools)")
_REGENERATE = "make_synthetic(root) (train.py does so when --data-root does not exist)"
DOWNLOAD_HELP = {  # layout name → its help; a layout of the user's gets none
    "voc": DownloadHelp(
        root=f"Get VOC 2012: {_VOC_URL}{_VOC_TAR}, plus SegmentationClassAug.zip (the "
        f"SBD-augmented masks) unpacked into VOCdevkit/VOC2012{_OR_SYNTHETIC}",
        masks="the SBD-augmented masks (index PNGs of the 10,582 train_aug and 1,449 val images; "
        "VOC's own SegmentationClass holds only 2,913) are missing: get SegmentationClassAug.zip, "
        f"the SBD masks in VOC format, widely mirrored (e.g. {_SBD_MASKS_URL}), and unpack it "
        f"beside JPEGImages; VOC 2012 itself is {_VOC_TAR} from {_VOC_URL}",
    ),
    "coco": DownloadHelp(
        root="Get COCO 2014 (train2014.zip, val2014.zip and annotations_trainval2014.zip from "
        f"http://images.cocodataset.org/) and convert it: {_PREPARE_COCO} writes "
        "JPEGImages/{train,val} and the masks SegmentationClass/{train,val}" + _OR_SYNTHETIC,
        masks="the VOC-style masks are missing: convert COCO 2014's instances_{train,val}2014.json "
        "into index PNGs (ids 0–80, 0 background) in SegmentationClass/{train,val}: "
        + _PREPARE_COCO,
    ),
    "synthetic": DownloadHelp(
        root=f"Generate it with {_REGENERATE}",
        masks="the synthetic set is incomplete: delete the folder and generate it again with "
        f"{_REGENERATE}",
    ),
}


def resolve_root(root: str, layout: Layout) -> str:
    """The folder under `root` (itself, or one of the layout's candidates) that holds the images;
    a DatasetError saying what is missing, and where to get it, when it holds no images or no
    masks."""
    source = DOWNLOAD_HELP.get(layout.name, DownloadHelp(root="", masks=""))
    marker = layout.image.split("/")[0]
    for candidate in layout.root_candidates:
        folder = os.path.normpath(os.path.join(root, candidate))
        if os.path.isdir(os.path.join(folder, marker)):
            mask_folder = layout.mask.split("/")[0]
            if not os.path.isdir(os.path.join(folder, mask_folder)):
                raise DatasetError(f"{folder} has no {mask_folder} folder: {source.masks}")
            return folder
    looked = ", ".join(os.path.join(root, c, marker) for c in layout.root_candidates)
    state = "does not exist" if not os.path.exists(root) else f"has no {marker} folder"
    raise DatasetError(
        f"dataset root {root} {state} (looked for {looked}). Expected layout: "
        f"root/{layout.image}, root/{layout.mask}, root/{layout.split_list}. {source.root}."
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
    check_same_size(mask.shape, image.shape[:2], mask_path, image_path)
    # The cached image-level labels were checked when derived; the mask may have changed since.
    present_classes(mask, num_classes, ignore_index, mask_path)
    return image, mask.astype(np.int32)  # PIL resizes it as mode "I", whatever the PNG held


def image_size(path: str) -> tuple[int, int]:
    """(H, W) of an image file, from its header alone."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except _DECODE_ERRORS as error:
        raise _unreadable("image", path, error) from error


def check_same_size(mask_shape: tuple, image_shape: tuple, mask_path: str, image_path: str) -> None:
    """A DatasetError naming both files when a mask (H, W) does not cover its image (H, W)."""
    if tuple(mask_shape) != tuple(image_shape):
        raise DatasetError(
            f"mask {mask_path} is {mask_shape[1]}×{mask_shape[0]} (W×H) but its image "
            f"{image_path} is {image_shape[1]}×{image_shape[0]}: a mask must label its "
            "image pixel for pixel (is it another image's mask, or was the image resized?)")


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
                       cache: str | None = None, description: str = "image-level labels",
                       image_paths: list[str] | None = None) -> np.ndarray:
    """(n, C−1) uint8 multi-hot: the foreground classes present in each mask.

    The masks are read once (threads: PNG decoding releases the GIL), each checked against its
    image's size where `image_paths` are given (training reads no mask: this is where a mask of
    another size shows); with `cache`, a file path, the result is stored there and read back
    while it holds the same mask paths.
    """
    if cache and os.path.isfile(cache):
        with np.load(cache) as stored:
            if "paths" in stored and stored["paths"].tolist() == mask_paths:
                return stored["labels"]

    def classes_of(path, image_path):
        mask = read_mask(path)  # (H, W)
        if image_path is not None:
            check_same_size(mask.shape, image_size(image_path), path, image_path)
        return present_classes(mask, num_classes, ignore_index, path)

    labels = np.zeros((len(mask_paths), num_classes - 1), dtype=np.uint8)  # (n, C−1)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        ids_per_mask = pool.map(classes_of, mask_paths, image_paths or [None] * len(mask_paths))
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
def random_rescale(image: np.ndarray, scale_range: tuple[float, float]) -> np.ndarray:
    """Resize (bilinear) by a factor drawn uniformly from `scale_range`."""
    low, high = scale_range
    scale = low + (high - low) * torch.rand(()).item()
    height, width = image.shape[:2]
    # PIL's (W, H), truncated by int() as in the release
    size = (max(1, int(scale * width)), max(1, int(scale * height)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def random_flip(image: np.ndarray) -> np.ndarray:
    """Mirror left to right with probability ½."""
    return image[:, ::-1] if torch.rand(()).item() > 0.5 else image


def random_crop(image: np.ndarray, crop_size: int):
    """A crop_size × crop_size window, the image padded with black where it is smaller:
    (S, S, 3) uint8 and the valid box (top, bottom, left, right), ends exclusive, of the image's
    real pixels in crop coordinates."""
    height, width = image.shape[:2]
    canvas_height, canvas_width = max(crop_size, height), max(crop_size, width)
    # The image sits at a random offset inside a black canvas at least crop × crop ...
    top = int(torch.randint(canvas_height - height + 1, ()))
    left = int(torch.randint(canvas_width - width + 1, ()))
    # ... and the crop window is drawn uniformly inside the canvas.
    crop_top = int(torch.randint(canvas_height - crop_size + 1, ()))
    crop_left = int(torch.randint(canvas_width - crop_size + 1, ()))
    image_canvas = np.zeros((canvas_height, canvas_width, 3), dtype=np.uint8)
    image_canvas[top : top + height, left : left + width] = image
    window = (slice(crop_top, crop_top + crop_size), slice(crop_left, crop_left + crop_size))
    valid_box = (
        max(top - crop_top, 0), min(top + height, crop_top + crop_size) - crop_top,
        max(left - crop_left, 0), min(left + width, crop_left + crop_size) - crop_left,
    )
    return image_canvas[window], valid_box


def augment(image: np.ndarray, crop_size: int, rescale_range: tuple[float, float] = (0.5, 2.0),
            flip: bool = True):
    """The release's training augmentation: rescale, flip, pad-and-crop.

    image (H, W, 3) uint8 → (S, S, 3) uint8 and the valid box. Training learns from image-level
    labels alone, so the mask is not augmented (nor read), as in the release's classification
    loader. The random numbers come from torch's generator, so `torch.manual_seed` and the
    DataLoader's per-worker seeding make it reproducible.
    """
    image = random_rescale(image, rescale_range)
    if flip:
        image = random_flip(image)
    return random_crop(image, crop_size)


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
      label       (H, W) int64, the ground-truth mask (not with `train=True`)
      cls_labels  (C−1,) float32, multi-hot over the foreground classes present in the mask
      valid_box   (4,) int64, (top, bottom, left, right), ends exclusive: the image's real pixels

    With `train=True`: the image alone is read (no loss uses the mask), then `augment` (random
    rescale by a factor in `rescale_range`, random horizontal flip, random crop_size × crop_size
    crop with black padding); images without any foreground class are skipped. With `train=False`: the full image, unaugmented, every image
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
            description=f"image-level labels of {layout.name} {split}",
            image_paths=[self.image_path(name) for name in names])
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
        cls_labels = torch.from_numpy(self.cls_labels[index].copy())  # (C−1,)
        if self.train:
            image, valid_box = augment(read_image(self.image_path(name)), self.crop_size,
                                       self.rescale_range, self.flip)  # (S, S, 3)
            return {"name": name, "image": normalize(image, self.mean, self.std),  # (3, S, S)
                    "cls_labels": cls_labels,
                    "valid_box": torch.tensor(valid_box, dtype=torch.int64)}  # (4,)
        image, mask = read_sample(self.image_path(name), self.mask_path(name), self.num_classes,
                                  self.ignore_index)  # (H, W, 3), (H, W)
        return {
            "name": name,
            "image": normalize(image, self.mean, self.std),  # (3, H, W)
            "label": torch.from_numpy(mask.astype(np.int64)),  # (H, W)
            "cls_labels": cls_labels,
            "valid_box": torch.tensor((0, mask.shape[0], 0, mask.shape[1]), dtype=torch.int64),
        }


def build_dataset(name: str, root: str, split: str, **kwargs) -> SegmentationDataset:
    """`SegmentationDataset` for "voc" (alias "VOC2012"), "coco" ("COCO", "coco2014") or
    "synthetic": the layout and `num_classes` come from the name; `kwargs` go to the reader.
    The synthetic set must exist first: `synthetic.make_synthetic(root)`."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        names = sorted(DATASETS) + sorted(_ALIASES)
        raise ValueError(f"name must be one of {names} (any case), got {name!r}")
    layout, class_names = DATASETS[key]
    kwargs.setdefault("num_classes", len(class_names))
    return SegmentationDataset(root=root, split=split, layout=layout, **kwargs)
