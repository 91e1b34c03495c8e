"""COCO 2014 from the official download → the VOC-style layout `data.py` reads (paper §4.1).

The paper trains and evaluates on MS COCO 2014 (82,081 train / 40,137 val images, 80 classes plus
background) with semantic masks made from the instance annotations. This script makes them from
`instances_{train,val}2014.json` and the `train2014/`, `val2014/` image folders:

    out/JPEGImages/{train,val}/<name>.jpg         hard links to the originals (copies where the
                                                  file system refuses a link; --symlink for links)
    out/SegmentationClass/{train,val}/<name>.png  index masks, mode "L": 0 background, 1–80 the
                                                  COCO categories in their usual order, 255 ignore

`<name>` is the image's file name without ".jpg" (`COCO_train2014_000000000009`), as in the
authors' split lists. Only numpy, pillow and tqdm are needed: no pycocotools.

How each annotation becomes pixels:
- Class ids: COCO's 80 category ids (1–90 with gaps) in increasing order → 1..80, so id 1
  (person) → 1 and id 90 (toothbrush) → 80. The file's categories must be COCO's.
- Polygons (`[[x0, y0, x1, y1, ...], ...]`, one list per part): pixel (x, y) is inside when its
  centre (x + 0.5, y + 0.5) is inside a part (even–odd rule; a centre on the left or top edge is
  out, on the right or bottom edge in), the parts united. The cocoapi's rasteriser approximates
  the same rule on a 5× finer grid; the two disagree on 0.15% of an object's pixels at 100 px
  radius, 0.5% at 30 px, 2.6% at 6 px (boundary pixels only; measured on random polygons).
  PIL's `ImageDraw.polygon` is not used: it also fills every pixel the outline touches, which
  grows each object by about half a pixel all round (+1% area at 100 px, +3% at 30 px, +20% at
  6 px against the cocoapi).
- RLE (`{"counts": ..., "size": [h, w]}`): runs of 0s and 1s, starting with 0s, over the pixels
  in column-major order. `counts` is a list (uncompressed, how COCO stores its crowd regions) or
  the cocoapi's compressed string: each run length, from the fourth on stored as the difference
  to the run two before, written in groups of 5 bits, least significant first, one character
  ('0' + 6 bits) per group; bit 0x20 marks that another group follows, bit 0x10 of the last group
  is the sign.

Decisions (the authors' README points to the converter github.com/alicranck/coco2voc, built on
the cocoapi's `annToMask`, or to masks on a drive made by an unpublished script; these follow the
converter):
- Crowd regions (`iscrowd: 1`) get their class, as the cocoapi's `annToMask` and that converter
  give them. `--crowd ignore` writes 255 there instead.
- Overlaps: where annotations overlap, the smaller one (by its `area`, else its pixel count) wins,
  on equal area the earlier in the file; so a person on a couch stays a person. Annotations are
  painted from the largest to the smallest.
- Images without any annotation (702 train, 367 val) are skipped and counted: the authors' split
  lists (82,081 / 40,137 names) leave them out, and `data.py` derives a split from the masks
  present. `--keep-empty` writes them as all-background masks.

Existing images in `out` are kept (every file is written under a temporary name and renamed, so
none is ever half-written); masks are always rewritten.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

SPLITS = ("train", "val")
IGNORE_INDEX = 255
BACKGROUND = 0
DOWNLOADS = "http://images.cocodataset.org"
ANNOTATIONS_ZIP = f"{DOWNLOADS}/annotations/annotations_trainval2014.zip"

# COCO's 80 object categories: (category id, name), in increasing id order; class id = index + 1.
COCO_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
CATEGORY_TO_CLASS = {category: index + 1 for index, (category, _) in enumerate(COCO_CATEGORIES)}

_CHAR_OFFSET = 48  # the compressed RLE's characters are '0' + a 6-bit code
_GROUP_BITS = 5
_MORE = 0x20  # another 5-bit group of the same number follows
_SIGN = 0x10  # in a number's last group: the number is negative
_MAX_GROUPS = 12  # 60 bits: far beyond any run length, and safe in int64
_NOT_RLE_CHARACTER = re.compile("[^0-o]")  # the 64 characters '0' (48) to 'o' (111)


class PrepareError(Exception):
    """A download that cannot be converted; the message names the file and the fix."""


class AnnotationError(ValueError):
    """A malformed segmentation; the caller adds which annotation it is."""


# =============================================================================================
# Run-length encoding
# =============================================================================================
def rle_counts_from_string(text: str) -> np.ndarray:
    """The run lengths stored in the cocoapi's compressed RLE string: (n,) int64.

    Each number is 5-bit groups, least significant first, one character ('0' + 6 bits) each;
    bit 0x20 says a group follows, bit 0x10 of the last group is the sign. From the fourth run
    on, the number is the difference to the run two before.
    """
    bad = _NOT_RLE_CHARACTER.search(text)
    if bad:
        raise AnnotationError(f"compressed RLE holds {bad.group()!r}; its characters are '0'–'o'")
    codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64) - _CHAR_OFFSET
    if codes.size == 0:
        return codes
    more = (codes & _MORE) != 0  # (L,)
    if more[-1]:
        raise AnnotationError("compressed RLE ends inside a number: the string is truncated")
    ends = np.flatnonzero(~more)  # (n,) last character of each number
    starts = np.concatenate([[0], ends[:-1] + 1])  # (n,)
    lengths = ends - starts + 1  # (n,) characters per number
    if lengths.max() > _MAX_GROUPS:
        raise AnnotationError(f"compressed RLE holds a number of {lengths.max()} characters")
    group = np.arange(codes.size) - np.repeat(starts, lengths)  # (L,) group index in its number
    values = np.add.reduceat((codes & (_MORE - 1)) << (_GROUP_BITS * group), starts)  # (n,)
    negative = (codes[ends] & _SIGN) != 0  # (n,)
    values = values - negative * (1 << (_GROUP_BITS * lengths))  # two's complement sign extension
    # run_i = value_i + run_{i−2} from i = 3 on: two running sums, over runs 1, 3, 5, ... and over
    # runs 2, 4, 6, ... (runs 0, 1 and 2 are stored as they are).
    counts = values.copy()
    counts[1::2] = np.cumsum(values[1::2])
    counts[2::2] = np.cumsum(values[2::2])
    return counts


def rle_decode(counts, height: int, width: int) -> np.ndarray:
    """Binary mask of run lengths over the pixels in column-major order, 0s first: (H, W) bool."""
    counts = np.asarray(counts)
    if counts.size == 0:
        counts = counts.astype(np.int64)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
        raise AnnotationError("RLE counts must be a list of integers or a compressed string")
    counts = counts.astype(np.int64)
    if (counts < 0).any():
        raise AnnotationError(f"RLE has a negative run length {int(counts.min())}")
    if counts.sum() != height * width:
        raise AnnotationError(f"RLE runs cover {int(counts.sum())} pixels, but the image has "
                              f"{height}×{width} = {height * width}")
    values = np.arange(counts.size) % 2 == 1  # (n,) runs alternate background, object, ...
    column_major = np.repeat(values, counts)  # (W·H,)
    return column_major.reshape(width, height).T  # (H, W)


# =============================================================================================
# Polygons
# =============================================================================================
def polygon_mask(polygons, height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies inside any of `polygons` ([x0, y0, x1, y1, ...] each): (H, W) bool.

    Scanline fill: for each pixel row, where its centre line y + 0.5 crosses the edges; between
    crossing 1 and 2, 3 and 4, ... (even–odd rule) the pixels with centres in (x_a, x_b] are in.
    """
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)  # (E, 2) vertices
        if not np.isfinite(points).all():
            raise AnnotationError("a polygon holds a coordinate that is not a finite number")
        if points.shape[0] < 3:
            continue  # a point or a line: no pixel centre is inside
        # Only the R × S pixels of the polygon's bounding box can be inside.
        top, bottom = np.clip(np.floor([points[:, 1].min(), points[:, 1].max() + 1]), 0, height)
        left, right = np.clip(np.floor([points[:, 0].min(), points[:, 0].max() + 1]), 0, width)
        top, bottom, left, right = int(top), int(bottom), int(left), int(right)
        if top >= bottom or left >= right:
            continue
        rows, cols = bottom - top, right - left
        x0, y0 = points[:, 0], points[:, 1]  # (E,) edge e runs from vertex e to vertex e + 1
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        centre_y = np.arange(top, bottom, dtype=np.float64)[:, None] + 0.5  # (R, 1)
        # Half-open in y, so a vertex on the centre line counts once for its two edges.
        crosses = (np.minimum(y0, y1) < centre_y) & (centre_y <= np.maximum(y0, y1))  # (R, E)
        with np.errstate(divide="ignore", invalid="ignore"):  # horizontal edges never cross
            crossing_x = x0 + (centre_y - y0) * (x1 - x0) / (y1 - y0)  # (R, E)
        crossing_x = np.sort(np.where(crosses, crossing_x, np.inf), axis=1)  # (R, E) inf last
        pairs = points.shape[0] // 2
        enter, leave = crossing_x[:, 0 : 2 * pairs : 2], crossing_x[:, 1 : 2 * pairs : 2]  # (R, P)
        inside = np.isfinite(leave)  # (R, P) the spans each row has
        # pixel x is in a span when enter < x + 0.5 <= leave: x from `first` to `last` − 1
        first = np.clip(np.floor(enter - 0.5) + 1 - left, 0, cols)[inside].astype(np.int64)
        last = np.clip(np.floor(leave - 0.5) + 1 - left, 0, cols)[inside].astype(np.int64)
        row = np.broadcast_to(np.arange(rows)[:, None], inside.shape)[inside]  # (spans,)
        # +1 where a span starts, −1 where it stops; a running sum along each row fills it.
        size = rows * (cols + 1)
        steps = (np.bincount(row * (cols + 1) + first, minlength=size)
                 - np.bincount(row * (cols + 1) + last, minlength=size))  # (R·(S+1),)
        spans = np.cumsum(steps.reshape(rows, cols + 1), axis=1)[:, :cols]  # (R, S)
        mask[top:bottom, left:right] |= spans > 0
    return mask


# =============================================================================================
# Annotations → one mask
# =============================================================================================
def annotation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """An annotation's `segmentation` (polygons or RLE) as an (H, W) bool mask."""
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if (not isinstance(polygon, list) or len(polygon) % 2
                    or not all(isinstance(v, (int, float)) for v in polygon)):
                raise AnnotationError("a polygon must be a list of numbers x0, y0, x1, y1, ...")
        return polygon_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = segmentation["size"]
        if not isinstance(size, list) or size != [height, width]:
            raise AnnotationError(f"RLE size {size} is not the image's [height, width] = "
                                  f"{[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, str):
            counts = rle_counts_from_string(counts)
        return rle_decode(counts, height, width)
    raise AnnotationError("segmentation must be a list of polygons or an RLE "
                          "{'counts': ..., 'size': [h, w]}")


def paint_mask(annotations: list[dict], height: int, width: int,
               crowd: str = "class") -> np.ndarray:
    """The semantic mask of one image from its annotations: (H, W) uint8.

    0 background, the class id (1–80) on each object, IGNORE_INDEX on crowd regions with
    `crowd="ignore"`. Where annotations overlap, the smaller one (by `area`, else by its pixel
    count) wins, on equal area the earlier one.
    """
    objects, areas = [], []
    for annotation in annotations:
        try:
            objects.append(annotation_mask(annotation["segmentation"], height, width))
        except AnnotationError as error:
            error.annotation_id = annotation.get("id")
            raise
        area = annotation.get("area")
        areas.append(area if isinstance(area, (int, float)) else int(objects[-1].sum()))
    winners_first = sorted(range(len(annotations)), key=lambda i: (areas[i], i))
    mask = np.full((height, width), BACKGROUND, dtype=np.uint8)
    for i in reversed(winners_first):  # the largest first, each later one paints over it
        if crowd == "ignore" and annotations[i].get("iscrowd", 0):
            mask[objects[i]] = IGNORE_INDEX
        else:
            mask[objects[i]] = CATEGORY_TO_CLASS[annotations[i]["category_id"]]
    return mask


# =============================================================================================
# Reading the download
# =============================================================================================
def load_annotations(coco_root: str, split: str) -> tuple[str, list[dict], dict[int, list[dict]]]:
    """(json path, image records sorted by file name, annotations grouped by image id), checked."""
    json_path = os.path.join(coco_root, "annotations", f"instances_{split}2014.json")
    if not os.path.isfile(json_path):
        raise PrepareError(
            f"annotation file {json_path} not found: download {ANNOTATIONS_ZIP} and unpack it "
            f"into {coco_root} (it holds annotations/instances_{{train,val}}2014.json)")
    try:
        with open(json_path) as f:
            content = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PrepareError(f"cannot read {json_path} as JSON ({error}): download "
                           f"{ANNOTATIONS_ZIP} again and unpack it") from error
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(content, dict) or not isinstance(content.get(k), list)]
    if missing:
        raise PrepareError(f"{json_path} has no {', '.join(missing)} list: is it a COCO "
                           f"instances file (instances_{split}2014.json)?")
    _check_categories(content["categories"], json_path)

    images = {}
    for image in content["images"]:
        complete = all(k in image for k in ("id", "file_name", "height", "width"))
        if not complete or not all(isinstance(image[k], int) and image[k] > 0
                                   for k in ("height", "width")):
            raise PrepareError(f"{json_path}: image record {image.get('id', image)} needs an id, "
                               "a file_name and a positive integer height and width")
        images[image["id"]] = image
    by_image: dict[int, list[dict]] = {}
    for annotation in content["annotations"]:
        where = f"{json_path}: annotation id {annotation.get('id', '?')}"
        for key in ("id", "image_id", "category_id", "segmentation"):
            if key not in annotation:
                raise PrepareError(f"{where} has no {key!r}: fix or remove this annotation")
        if annotation["image_id"] not in images:
            raise PrepareError(f"{where} refers to image id {annotation['image_id']}, which is "
                               "not in the file's images: fix or remove this annotation")
        if annotation["category_id"] not in CATEGORY_TO_CLASS:
            raise PrepareError(f"{where} has category id {annotation['category_id']}, which is "
                               "not one of COCO's 80: fix or remove this annotation")
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    ordered = sorted(images.values(), key=lambda image: image["file_name"])
    return json_path, ordered, by_image


def _check_categories(categories: list[dict], json_path: str) -> None:
    names = dict(COCO_CATEGORIES)
    for category in categories:
        category_id, name = category.get("id"), category.get("name")
        if category_id not in names or (name is not None and name != names[category_id]):
            raise PrepareError(
                f"{json_path} has category {category_id} {name!r}, but COCO's id {category_id} "
                f"is {names.get(category_id, 'no category')!r}: this script converts COCO 2014's "
                "80 categories (ids 1–90 with gaps) only")


# =============================================================================================
# Writing the layout
# =============================================================================================
def place_image(source: str, target: str, symlink: bool = False) -> str:
    """Put `source` at `target`: a symbolic link, else a hard link, else a copy. Returns which
    ("kept" when `target` exists already)."""
    if os.path.lexists(target):
        return "kept"
    if symlink:
        os.symlink(os.path.abspath(source), target)
        return "symlinked"
    try:
        os.link(source, target)
        return "hard-linked"
    except OSError:  # another file system, or links not allowed: copy
        temporary = target + ".tmp"
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
        return "copied"


def _prepare_image(task: tuple) -> str:
    """Write one image's mask and place the image; returns how the image was placed."""
    image, annotations, source, image_target, mask_target, symlink, crowd, json_path = task
    try:
        mask = paint_mask(annotations, image["height"], image["width"], crowd)  # (H, W)
    except AnnotationError as error:
        raise PrepareError(
            f"{json_path}: annotation id {error.annotation_id} (image {image['file_name']}): "
            f"{error}; fix or remove this annotation") from None
    temporary = mask_target + ".tmp"
    Image.fromarray(mask).save(temporary, format="PNG")
    os.replace(temporary, mask_target)
    return place_image(source, image_target, symlink)


def prepare_split(coco_root: str, out: str, split: str, *, symlink: bool = False,
                  crowd: str = "class", keep_empty: bool = False, workers: int = 1) -> dict:
    """Convert one split; returns counts {"masks", "empty_skipped", <how images were placed>}."""
    image_folder = os.path.join(coco_root, f"{split}2014")
    if not os.path.isdir(image_folder):
        raise PrepareError(f"image folder {image_folder} not found: download "
                           f"{DOWNLOADS}/zips/{split}2014.zip and unpack it into {coco_root}")
    json_path, images, by_image = load_annotations(coco_root, split)
    kept = [image for image in images if keep_empty or image["id"] in by_image]
    sources = [os.path.join(image_folder, image["file_name"]) for image in kept]
    missing = [path for path in sources if not os.path.isfile(path)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PrepareError(f"image {missing[0]}{more} listed in {json_path} is missing: unpack "
                           f"{split}2014.zip into {coco_root} completely")

    image_dir = os.path.join(out, "JPEGImages", split)
    mask_dir = os.path.join(out, "SegmentationClass", split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    tasks = []
    for image, source in zip(kept, sources):
        name = os.path.splitext(image["file_name"])[0]
        tasks.append((image, by_image.get(image["id"], []), source,
                      os.path.join(image_dir, name + ".jpg"), os.path.join(mask_dir, name + ".png"),
                      symlink, crowd, json_path))
    counts = {"masks": len(tasks), "empty_skipped": len(images) - len(kept)}
    with tqdm(total=len(tasks), unit="image", desc=f"{split}2014") as progress:
        # closed before an error propagates, so the error gets a line of its own
        if workers > 1:
            with multiprocessing.Pool(workers) as pool:
                for how in pool.imap_unordered(_prepare_image, tasks, chunksize=16):
                    counts[how] = counts.get(how, 0) + 1
                    progress.update()
        else:
            for task in tasks:
                how = _prepare_image(task)
                counts[how] = counts.get(how, 0) + 1
                progress.update()
    return counts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Turn the official COCO 2014 download (train2014/, val2014/, "
        "annotations/instances_{train,val}2014.json) into JPEGImages/{train,val} and "
        "SegmentationClass/{train,val} index masks (0 background, 1–80 COCO's categories).",
        allow_abbrev=False)
    parser.add_argument("--coco-root", required=True,
                        help="folder holding train2014/, val2014/ and annotations/")
    parser.add_argument("--out", default="data/coco", help="where to write the VOC-style layout")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    parser.add_argument("--symlink", action="store_true",
                        help="symbolic links to the images instead of hard links or copies")
    parser.add_argument("--crowd", choices=("class", "ignore"), default="class",
                        help="crowd regions get their class (as the cocoapi's annToMask), or 255")
    parser.add_argument("--keep-empty", action="store_true",
                        help="also write images without annotations, as all-background masks")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes writing masks (default: one per CPU core)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: give at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        for split in args.splits:
            counts = prepare_split(args.coco_root, args.out, split, symlink=args.symlink,
                                   crowd=args.crowd, keep_empty=args.keep_empty,
                                   workers=args.workers)
            placed = ", ".join(f"{how} {n:,}" for how, n in counts.items()
                               if how not in ("masks", "empty_skipped"))
            skipped = ("" if args.keep_empty else
                       f"; {counts['empty_skipped']:,} images without annotations skipped")
            print(f"{split}: {counts['masks']:,} masks in "
                  f"{os.path.join(args.out, 'SegmentationClass', split)}, images {placed}{skipped}")
    except PrepareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"train with: python train.py --data COCO --data-root {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
