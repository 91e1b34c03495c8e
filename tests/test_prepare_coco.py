"""Tests of prepare_coco.py on tiny hand-made COCO downloads: the masks against the cocoapi's own
`annToMask` (polygons of several parts, overlaps, crowd RLE compressed and uncompressed), the class
mapping, the overlap and crowd rules, the written layout as data.py reads it, and one clear error
per mistake, a missing pycocotools included."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

import data
import prepare_coco as prep

# pycocotools' own decode, under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture
def cocoapi():
    """pycocotools.mask; the test is skipped where pycocotools is not installed."""
    return pytest.importorskip("pycocotools.mask")


def encode_counts(mask):
    """Uncompressed RLE, as COCO stores crowd regions: run lengths of a binary (H, W) mask over
    its pixels in column-major order, 0s first."""
    flat = np.asarray(mask, dtype=bool).T.ravel()  # column-major
    counts, value, run = [], False, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return counts


def compressed(mask):
    """The cocoapi's compressed RLE string of a binary (H, W) mask."""
    from pycocotools import mask as api
    return api.encode(np.asfortranarray(mask, dtype=np.uint8))["counts"].decode()


# --- categories ----------------------------------------------------------------------------------
def test_categories_are_cocos_80_in_id_order():
    ids = [category for category, _ in prep.COCO_CATEGORIES]
    assert len(ids) == 80 and ids == sorted(set(ids)) and ids[0] == 1 and ids[-1] == 90
    assert [name for _, name in prep.COCO_CATEGORIES] == list(data.COCO_CLASSES[1:])
    assert prep.CATEGORY_TO_CLASS[1] == 1 and prep.CATEGORY_TO_CLASS[90] == 80
    assert prep.CATEGORY_TO_CLASS[13] == 12  # stop sign: after the gap at 12


# --- a tiny download ---------------------------------------------------------------------------
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
              {"id": 90, "name": "toothbrush", "supercategory": "indoor"}]
PERSON, TOOTHBRUSH = 1, 80  # their class ids


def block(height, width, rows, cols):
    mask = np.zeros((height, width), dtype=bool)
    mask[rows, cols] = True
    return mask


def val_object():
    return np.random.default_rng(3).random((8, 8)) < 0.4


def expected_train_mask(crowd_value=TOOTHBRUSH):
    """Image 1 (10 × 12), painted by hand from the largest annotation to the smallest."""
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[0:6, 0:4] = crowd_value  # crowd, area 24
    mask[2:5, 2:6] = PERSON  # polygon, area 12: smaller, so on top of the crowd
    mask[8:10, 7:12] = PERSON  # polygon without "area" (10 pixels): ties with the next one ...
    mask[7:9, 6:11] = TOOTHBRUSH  # ... compressed RLE, area 10, earlier in the file: wins
    return mask


def write_split(root, split, images, annotations):
    """<root>/<split>2014/ with random images (id, file name, height, width) and
    <root>/annotations/instances_<split>2014.json; returns the JSON's path."""
    rng = np.random.default_rng(0)
    folder = os.path.join(root, f"{split}2014")
    os.makedirs(folder, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    records = []
    for image_id, file_name, height, width in images:
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, file_name))
        records.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    path = os.path.join(root, "annotations", f"instances_{split}2014.json")
    with open(path, "w") as f:
        json.dump({"images": records, "annotations": annotations, "categories": CATEGORIES}, f)
    return path


def write_download(root, annotations_train=None):
    """train2014/ (3 images, one without annotations), val2014/ (1 image), annotations/."""
    if annotations_train is None:
        annotations_train = [
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 12.0,
             "segmentation": [[2, 2, 6, 2, 6, 5, 2, 5]]},
            {"id": 12, "image_id": 1, "category_id": 90, "iscrowd": 1, "area": 24,
             "segmentation": {"counts": encode_counts(block(10, 12, slice(0, 6), slice(0, 4))),
                              "size": [10, 12]}},
            {"id": 13, "image_id": 1, "category_id": 90, "iscrowd": 0, "area": 10.0,
             "segmentation": {"counts": compressed(block(10, 12, slice(7, 9), slice(6, 11))),
                              "size": [10, 12]}},
            {"id": 14, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [[7, 8, 12, 8, 12, 10, 7, 10]]},
            # image 2: one object in two parts
            {"id": 21, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 13.0,
             "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2], [4, 3, 7, 3, 7, 6, 4, 6]]},
        ]
    write_split(root, "train", [(1, "COCO_train2014_000000000001.jpg", 10, 12),
                                (2, "COCO_train2014_000000000002.jpg", 6, 7),
                                (3, "COCO_train2014_000000000003.jpg", 5, 5)], annotations_train)
    write_split(root, "val", [(42, "COCO_val2014_000000000042.jpg", 8, 8)], [
        {"id": 51, "image_id": 42, "category_id": 90, "iscrowd": 0,
         "area": float(val_object().sum()),
         "segmentation": {"counts": compressed(val_object()), "size": [8, 8]}}])


def read(path):
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


@pytest.fixture
def download(tmp_path, cocoapi):
    root = str(tmp_path / "coco2014")
    write_download(root)
    return root


def run(download, out, *flags):
    return prep.main(["--coco-root", download, "--out", str(out), "--workers", "1", *flags])


def test_writes_the_voc_layout_with_exact_pixels(download, tmp_path, capsys):
    out = tmp_path / "coco"
    assert run(download, out) == 0
    masks = out / "SegmentationClass"
    np.testing.assert_array_equal(read(masks / "train" / "COCO_train2014_000000000001.png"),
                                  expected_train_mask())
    two_parts = np.zeros((6, 7), dtype=np.uint8)
    two_parts[0:2, 0:2] = PERSON
    two_parts[3:6, 4:7] = PERSON
    np.testing.assert_array_equal(read(masks / "train" / "COCO_train2014_000000000002.png"),
                                  two_parts)
    np.testing.assert_array_equal(read(masks / "val" / "COCO_val2014_000000000042.png"),
                                  val_object() * TOOTHBRUSH)
    # the image without annotations is skipped, and said so
    assert sorted(os.listdir(masks / "train")) == ["COCO_train2014_000000000001.png",
                                                   "COCO_train2014_000000000002.png"]
    assert sorted(os.listdir(out / "JPEGImages" / "train")) == [
        "COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg"]
    printed = capsys.readouterr().out
    assert "train: 2 masks" in printed and "1 images without annotations skipped" in printed
    # images are hard links to the originals
    original = os.path.join(download, "val2014", "COCO_val2014_000000000042.jpg")
    placed = out / "JPEGImages" / "val" / "COCO_val2014_000000000042.jpg"
    assert os.path.samefile(original, placed) and not os.path.islink(placed)


def test_data_py_reads_the_result(download, tmp_path):
    out = tmp_path / "coco"
    assert run(download, out) == 0
    dataset = data.build_dataset("coco", str(out), "train", train=False)
    assert dataset.names == ["COCO_train2014_000000000001", "COCO_train2014_000000000002"]
    item = dataset[0]
    assert item["cls_labels"].nonzero().flatten().tolist() == [PERSON - 1, TOOTHBRUSH - 1]
    np.testing.assert_array_equal(item["label"].numpy(), expected_train_mask())


def test_crowd_ignore_keep_empty_and_symlinks(download, tmp_path):
    out = tmp_path / "coco"
    assert run(download, out, "--crowd", "ignore", "--keep-empty", "--symlink",
               "--splits", "train") == 0
    masks = out / "SegmentationClass" / "train"
    np.testing.assert_array_equal(read(masks / "COCO_train2014_000000000001.png"),
                                  expected_train_mask(crowd_value=prep.IGNORE_INDEX))
    np.testing.assert_array_equal(read(masks / "COCO_train2014_000000000003.png"),
                                  np.zeros((5, 5), dtype=np.uint8))
    assert os.path.islink(out / "JPEGImages" / "train" / "COCO_train2014_000000000003.jpg")
    assert not (out / "SegmentationClass" / "val").exists()


def test_workers_and_reruns_give_the_same_masks(download, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(download, one) == 0
    assert prep.main(["--coco-root", download, "--out", str(two), "--workers", "2"]) == 0
    assert run(download, two) == 0  # a second run keeps the images, rewrites the masks
    assert "kept 2" in capsys.readouterr().out
    for split in ("train", "val"):
        names = sorted(os.listdir(one / "SegmentationClass" / split))
        assert names == sorted(os.listdir(two / "SegmentationClass" / split))
        for name in names:
            np.testing.assert_array_equal(read(one / "SegmentationClass" / split / name),
                                          read(two / "SegmentationClass" / split / name))


def random_annotations(rng, image_id, height, width, first_id):
    """Overlapping objects of every kind over one image: polygons of 1–3 parts (vertices off the
    pixel grid, some outside the image, a part of 2 points), crowd regions as uncompressed and as
    compressed RLE, an object given as compressed RLE, one without `area`, two of equal area."""
    annotations = []
    for k in range(10):
        kind = k % 4
        annotation = {"id": first_id + k, "image_id": image_id, "category_id": (1, 90)[k % 3 % 2],
                      "iscrowd": int(kind >= 2 and k != 7)}
        if kind < 2:
            parts = []
            for _ in range(1 + k % 3):
                corners = rng.integers(3, 12)
                angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
                radii = rng.uniform(2, 0.4 * min(height, width), corners)
                centre = rng.uniform(-3, [width + 3, height + 3])
                parts.append(np.stack([centre[0] + radii * np.cos(angles),
                                       centre[1] + radii * np.sin(angles)], 1).ravel().tolist())
            if k == 5:
                parts.append(rng.uniform(0, min(height, width), 4).tolist())  # 2 points
            annotation["segmentation"] = parts
        else:
            top, left = rng.integers(0, height - 2), rng.integers(0, width - 2)
            blob = np.zeros((height, width), dtype=bool)
            blob[top:top + rng.integers(2, height), left:left + rng.integers(2, width)] = True
            blob &= rng.random((height, width)) < 0.8
            counts = encode_counts(blob) if kind == 2 else compressed(blob)
            annotation["segmentation"] = {"counts": counts, "size": [height, width]}
        annotation["area"] = round(float(rng.uniform(5, height * width / 4)), 2)
        annotations.append(annotation)
    del annotations[4]["area"]  # then its pixel count
    annotations[8]["area"] = annotations[1]["area"]  # a tie: the earlier one wins
    return annotations


def cocoapi_masks(json_path, image_id, crowd):
    """The semantic mask from the cocoapi's `annToMask` of each annotation, painted as the authors'
    converter does: smallest `area` (else pixel count) first, stable, the first to claim a
    pixel keeps it."""
    from pycocotools.coco import COCO
    coco = COCO(json_path)
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))  # in the file's order
    objects = [coco.annToMask(annotation).astype(bool) for annotation in annotations]
    assert (np.sum(objects, axis=0) > 1).any()  # the objects overlap
    areas = [annotation.get("area", mask.sum()) for annotation, mask in zip(annotations, objects)]
    semantic = np.zeros(objects[0].shape, dtype=np.uint8)
    claimed = np.zeros(objects[0].shape, dtype=bool)
    for i in sorted(range(len(annotations)), key=lambda i: areas[i]):
        value = {1: PERSON, 90: TOOTHBRUSH}[annotations[i]["category_id"]]
        if crowd == "ignore" and annotations[i]["iscrowd"]:
            value = prep.IGNORE_INDEX
        semantic[objects[i] & ~claimed] = value
        claimed |= objects[i]
    return semantic


@pytest.mark.parametrize("crowd", ["class", "ignore"])
def test_masks_equal_the_cocoapi_annToMask(tmp_path, cocoapi, crowd):
    rng = np.random.default_rng(7)
    root, images, annotations = str(tmp_path / "coco2014"), [], []
    for image_id, (height, width) in enumerate([(37, 53), (61, 44), (50, 50)], start=1):
        images.append((image_id, f"COCO_train2014_{image_id:012d}.jpg", height, width))
        annotations += random_annotations(rng, image_id, height, width, 100 * image_id)
    json_path = write_split(root, "train", images, annotations)
    out = tmp_path / "coco"
    assert prep.main(["--coco-root", root, "--out", str(out), "--splits", "train",
                      "--crowd", crowd, "--workers", "1"]) == 0
    for image_id, file_name, _, _ in images:
        written = read(out / "SegmentationClass" / "train" / file_name.replace(".jpg", ".png"))
        np.testing.assert_array_equal(written, cocoapi_masks(json_path, image_id, crowd))


# --- errors: one line, naming the file or annotation and the fix -------------------------------
def error_of(capsys, argv):
    assert prep.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # a progress bar may come first
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1
    return lines[-1]


def test_missing_annotation_file(download, tmp_path, capsys):
    os.remove(os.path.join(download, "annotations", "instances_val2014.json"))
    message = error_of(capsys, ["--coco-root", download, "--out", str(tmp_path / "o"),
                                "--splits", "val"])
    assert "instances_val2014.json not found" in message
    assert "annotations_trainval2014.zip" in message


def test_missing_image_folder(tmp_path, capsys, cocoapi):
    message = error_of(capsys, ["--coco-root", str(tmp_path / "nowhere"), "--out",
                                str(tmp_path / "o")])
    assert "image folder" in message and "train2014 not found" in message
    assert "zips/train2014.zip" in message


def test_missing_image_file(download, tmp_path, capsys):
    os.remove(os.path.join(download, "train2014", "COCO_train2014_000000000002.jpg"))
    message = error_of(capsys, ["--coco-root", download, "--out", str(tmp_path / "o")])
    assert "COCO_train2014_000000000002.jpg" in message and "is missing" in message


def test_not_json(download, tmp_path, capsys):
    with open(os.path.join(download, "annotations", "instances_train2014.json"), "w") as f:
        f.write("{not json")
    message = error_of(capsys, ["--coco-root", download, "--out", str(tmp_path / "o")])
    assert "cannot read" in message and "instances_train2014.json as JSON" in message


@pytest.mark.parametrize("segmentation, problem", [
    ({"counts": [2, 3], "size": [10, 12]}, "cover 5 pixels"),
    ({"counts": [2, -3, 121], "size": [10, 12]}, "run lengths (integers ≥ 0)"),
    ({"counts": "5X1 2", "size": [10, 12]}, "not a 10×12 mask as the cocoapi writes it"),
    ({"counts": "52", "size": [10, 12]}, "runs that do not cover the image"),
    ({"counts": [120], "size": [12, 10]}, "not the image's"),
    ([[1, 2, 3, 4, 5]], "polygon must be"),
    ([[1, 2, 3, float("inf"), 5, 6]], "not a finite number"),
    ("person", "segmentation must be"),
])
def test_malformed_annotation_names_its_id(tmp_path, capsys, cocoapi, segmentation, problem):
    root = str(tmp_path / "coco2014")
    write_download(root, annotations_train=[
        {"id": 11, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 6, 2, 6, 5]]},
        {"id": 777, "image_id": 1, "category_id": 1, "segmentation": segmentation}])
    message = error_of(capsys, ["--coco-root", root, "--out", str(tmp_path / "o"),
                                "--workers", "1"])
    assert "annotation id 777" in message and problem in message
    assert "COCO_train2014_000000000001.jpg" in message and "fix or remove" in message


def test_unknown_category_and_foreign_names(tmp_path, capsys, cocoapi):
    root = str(tmp_path / "coco2014")
    write_download(root, annotations_train=[
        {"id": 5, "image_id": 1, "category_id": 12, "segmentation": [[2, 2, 6, 2, 6, 5]]}])
    message = error_of(capsys, ["--coco-root", root, "--out", str(tmp_path / "o")])
    assert "annotation id 5" in message and "category id 12" in message
    path = os.path.join(root, "annotations", "instances_train2014.json")
    with open(path) as f:
        content = json.load(f)
    content["categories"][0]["name"] = "aeroplane"
    with open(path, "w") as f:
        json.dump(content, f)
    message = error_of(capsys, ["--coco-root", root, "--out", str(tmp_path / "o")])
    assert "category 1 'aeroplane'" in message and "'person'" in message


def test_missing_pycocotools_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # import pycocotools fails
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    message = error_of(capsys, ["--coco-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "pycocotools is not installed: pip install pycocotools" in message
    assert not os.path.exists(tmp_path / "o")  # said before anything is written
