"""COCO 2014 from the official download → the VOC-style layout `data.py` reads (paper §4.1).

The paper trains and evaluates on MS COCO 2014 (82,081 train / 40,137 val images, 80 classes plus
background) with semantic masks made from the instance annotations. This script makes them from
`instances_{train,val}2014.json` and the `train2014/`, `val2014/` image folders:

    out/JPEGImages/{train,val}/<name>.jpg         hard links to the originals (copies where the
                                                  file system refuses a link; --symlink for links)
    out/SegmentationClass/{train,val}/<name>.png  index masks, mode "L": 0 background, 1–80 the
                                                  COCO categories in their usual order, 255 ignore

`<name>` is the image's file name without ".jpg" (`COCO_train2014_000000000009`), as in the
authors' split lists. Needs pycocotools, the cocoapi (`pip install pycocotools`), besides numpy,
pillow and tqdm.

How each annotation becomes pixels:
- Class ids: COCO's 80 category ids (1–90 with gaps) in increasing order → 1..80, so id 1
  (person) → 1 and id 90 (toothbrush) → 80. The file's categories must be COCO's.
- Each annotation's pixels are the cocoapi's `COCO.annToMask`: polygons (`[[x0, y0, x1, y1, ...],
  ...]`, one list per part, the parts united) rasterised by it, RLE (`{"counts": ..., "size":
  [h, w]}`, `counts` a list as COCO stores its crowd regions, or the cocoapi's compressed string)
  decoded by it: the masks of COCO's own tools, as the authors' converter made them. A polygon part
  of under 3 points is left out (it covers no pixel; `annToMask` would read a first part of 2
  points as a box [x, y, w, h], and refuse one of 1).

Decisions (the authors' README points to the converter github.com/alicranck/coco2voc, built on
the cocoapi, or to masks on a drive made by an unpublished script; these follow the converter):
- Crowd regions (`iscrowd: 1`) get their class, as the cocoapi's `annToMask` and that converter
  give them. `--crowd ignore` writes 255 there instead.
- Overlaps: where annotations overlap, the smaller one (by its `area`, else its pixel count) wins,
  on equal area the earlier in the file; so a person on a couch stays a person. This is the
  converter's rule (a stable sort by `area`, the first to claim a pixel keeps it); here the
  annotations are painted from the largest to the smallest, each over the ones before.
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


class PrepareError(Exception):
    """A download that cannot be converted; the message names the file and the fix."""


class AnnotationError(ValueError):
    """A malformed segmentation; the caller adds which annotation it is."""


# =============================================================================================
# Annotations → one mask, by the cocoapi
# =============================================================================================
def cocoapi_mask():
    """`pycocotools.mask`, the cocoapi's mask functions: an extra that only this script needs."""
    try:
        from pycocotools import mask
    except ImportError:
        raise PrepareError("prepare_coco.py makes the masks with the cocoapi, and pycocotools is "
                           "not installed: pip install pycocotools") from None
    return mask


def annotation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """An annotation's `segmentation` (polygons or RLE) as an (H, W) bool mask, the cocoapi's
    `COCO.annToMask`: polygon parts united, uncompressed and compressed RLE decoded.

    The input is checked first, as the cocoapi does not check it (runs that fall short of the
    image, for one, leave pixels unset).
    """
    api = cocoapi_mask()
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if (not isinstance(polygon, list) or len(polygon) % 2
                    or not all(isinstance(v, (int, float)) for v in polygon)):
                raise AnnotationError("a polygon must be a list of numbers x0, y0, x1, y1, ...")
            if not np.isfinite(polygon).all():
                raise AnnotationError("a polygon holds a coordinate that is not a finite number")
        # A part of under 3 points covers no pixel in the cocoapi; leaving it out also keeps it
        # from being read as a box [x, y, w, h] where it comes first.
        parts = [polygon for polygon in segmentation if len(polygon) >= 6]
        if not parts:
            return np.zeros((height, width), dtype=bool)
        return api.decode(api.merge(api.frPyObjects(parts, height, width))).astype(bool)
    if not (isinstance(segmentation, dict) and "counts" in segmentation
            and "size" in segmentation):
        raise AnnotationError("segmentation must be a list of polygons or an RLE "
                              "{'counts': ..., 'size': [h, w]}")
    size, counts = segmentation["size"], segmentation["counts"]
    if not isinstance(size, list) or size != [height, width]:
        raise AnnotationError(f"RLE size {size} is not the image's [height, width] = "
                              f"{[height, width]}")
    if isinstance(counts, str):  # compressed, as the cocoapi writes it
        try:
            mask = api.decode({"counts": counts, "size": size})  # (H, W) uint8
        except ValueError:  # runs past the image's end
            mask = None
        # Runs that fall short of the image leave pixels unset: the encoding of the mask
        # decoded, canonical, then differs from the string.
        if mask is None or api.encode(np.asfortranarray(mask))["counts"] != counts.encode():
            raise AnnotationError(f"compressed RLE {counts[:20]!r} is not a {height}×{width} "
                                  "mask as the cocoapi writes it (characters outside '0'–'o', "
                                  "or runs that do not cover the image)")
        return mask.astype(bool)
    if not (isinstance(counts, list)  # the cocoapi keeps run lengths as uint32
            and all(isinstance(c, int) and 0 <= c < 2**32 for c in counts)):
        raise AnnotationError("RLE counts must be a list of run lengths (integers ≥ 0) or the "
                              "cocoapi's compressed string")
    if sum(counts) != height * width:
        raise AnnotationError(f"RLE runs cover {sum(counts)} pixels, but the image has "
                              f"{height}×{width} = {height * width}")
    return api.decode(api.frPyObjects(segmentation, height, width)).astype(bool)


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
        "SegmentationClass/{train,val} index masks (0 background, 1–80 COCO's categories), "
        "drawn by the cocoapi (pip install pycocotools).",
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
        cocoapi_mask()  # missing: said before any file is read or written
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
