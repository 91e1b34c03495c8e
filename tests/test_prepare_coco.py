"""Tests of prepare_coco.py on a tiny hand-made COCO download: RLE (list and compressed string)
and polygon rasterisation against known answers and naive references, the class mapping, the
overlap and crowd rules, the written layout as data.py reads it, and one clear error per mistake."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import data
import prepare_coco as prep


# --- an independent encoder, written from the format's definition -----------------------------
def encode_counts(mask):
    """Run lengths of a binary (H, W) mask over its pixels in column-major order, 0s first."""
    flat = np.asarray(mask, dtype=bool).T.ravel()  # column-major
    counts, value, run = [], False, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return counts


def counts_to_string(counts):
    """The compressed string: from the 4th run on, the difference to the run two before; each
    number in 5-bit groups, least significant first, as chr(48 + group), 0x20 = more groups
    follow, 0x10 in the last group = negative."""
    text = []
    for i, count in enumerate(counts):
        number = count - counts[i - 2] if i > 2 else count
        while True:
            group = number & 0x1F
            number >>= 5  # arithmetic shift: a negative number tends to −1
            done = number == -1 if group & 0x10 else number == 0
            text.append(chr(48 + (group if done else group | 0x20)))
            if done:
                break
    return "".join(text)


def inside_naive(polygons, height, width):
    """Pixel by pixel: the centre (x + .5, y + .5) is inside when an odd number of edges crossing
    its row (half-open in y) cross strictly left of it, in any polygon."""
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=float).reshape(-1, 2)
        for y in range(height):
            for x in range(width):
                px, py = x + 0.5, y + 0.5
                crossings = 0
                for (x0, y0), (x1, y1) in zip(points, np.roll(points, -1, axis=0)):
                    if min(y0, y1) < py <= max(y0, y1):
                        if x0 + (py - y0) * (x1 - x0) / (y1 - y0) < px:
                            crossings += 1
                mask[y, x] |= crossings % 2 == 1
    return mask


# --- RLE ---------------------------------------------------------------------------------------
def test_compressed_string_known_answer():
    # Worked by hand: 5 → "5", 40 → "X1" (8 with 0x20, then 1), 2 → "2", and the 4th run 1 is
    # stored as 1 − 40 = −39 → "iN" (25 with 0x20, then 30 = −2 in 5 bits, sign bit set).
    assert prep.rle_counts_from_string("5X12iN").tolist() == [5, 40, 2, 1]
    assert counts_to_string([5, 40, 2, 1]) == "5X12iN"
    assert prep.rle_counts_from_string("").tolist() == []


def test_rle_decode_is_column_major_and_starts_with_background():
    # 2 × 3 image, column-major pixels: 0 0 | 1 1 | 1 0
    expected = np.array([[0, 1, 1], [0, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(prep.rle_decode([2, 3, 1], 2, 3), expected)
    # a mask whose first pixel is set starts with an empty background run
    np.testing.assert_array_equal(prep.rle_decode([0, 1, 5], 2, 3),
                                  np.array([[1, 0, 0], [0, 0, 0]], dtype=bool))


@pytest.mark.parametrize("seed", range(6))
def test_rle_round_trip(seed):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 90, size=2)
    kind = seed % 3
    if kind == 0:  # scattered pixels: many short runs
        mask = rng.random((height, width)) < rng.random()
    elif kind == 1:  # one block: runs of hundreds, numbers of several characters
        mask = np.zeros((height, width), dtype=bool)
        mask[rng.integers(0, height):, rng.integers(0, width):] = True
    else:  # empty or full
        mask = np.full((height, width), seed % 2 == 0)
    counts = encode_counts(mask)
    np.testing.assert_array_equal(prep.rle_decode(counts, height, width), mask)
    text = counts_to_string(counts)
    assert prep.rle_counts_from_string(text).tolist() == counts
    decoded = prep.rle_decode(prep.rle_counts_from_string(text), height, width)
    np.testing.assert_array_equal(decoded, mask)


def test_long_runs_and_negative_differences_decode():
    counts = [0, 409_600 - 3, 1, 1, 1]  # 640 × 640: a huge run, then a difference of −409,596
    text = counts_to_string(counts)
    assert prep.rle_counts_from_string(text).tolist() == counts


@pytest.mark.parametrize("text, message", [
    ("5X1 2", "holds ' '"),
    ("5X1é", "holds 'é'"),
    ("5X", "truncated"),
    ("5" + "X" * 13 + "1", "characters"),
])
def test_malformed_strings_are_refused(text, message):
    with pytest.raises(prep.AnnotationError, match=message):
        prep.rle_counts_from_string(text)


def test_rle_that_does_not_cover_the_image_is_refused():
    with pytest.raises(prep.AnnotationError, match="cover 5 pixels.*2×3 = 6"):
        prep.rle_decode([2, 3], 2, 3)


# --- polygons ----------------------------------------------------------------------------------
def test_rectangle_has_its_area():
    # x from 2 to 6, y from 2 to 5: the pixels whose centres are inside, 4 × 3 = 12 = its area
    mask = prep.polygon_mask([[2, 2, 6, 2, 6, 5, 2, 5]], 8, 9)
    expected = np.zeros((8, 9), dtype=bool)
    expected[2:5, 2:6] = True
    np.testing.assert_array_equal(mask, expected)
    # centres on the left / top edge are out, on the right / bottom edge in (as the cocoapi's)
    mask = prep.polygon_mask([[2.5, 2.5, 6.5, 2.5, 6.5, 5.5, 2.5, 5.5]], 8, 9)
    expected = np.zeros((8, 9), dtype=bool)
    expected[3:6, 3:7] = True
    np.testing.assert_array_equal(mask, expected)


def test_polygons_match_the_pixel_by_pixel_reference():
    rng = np.random.default_rng(0)
    for trial in range(12):
        height, width = rng.integers(5, 25, size=2)
        # random polygons, some reaching outside the image, some self-intersecting; two parts
        polygons = [rng.uniform(-4, max(height, width) + 4, size=2 * rng.integers(3, 9)).tolist()
                    for _ in range(1 + trial % 2)]
        np.testing.assert_array_equal(prep.polygon_mask(polygons, height, width),
                                      inside_naive(polygons, height, width))


def test_degenerate_polygons_are_empty():
    assert not prep.polygon_mask([[], [3, 3], [1, 1, 5, 5]], 6, 6).any()
    assert not prep.polygon_mask([[10, 10, 20, 10, 20, 20]], 6, 6).any()  # outside the image


def test_triangle_area_converges_to_the_shoelace_area():
    # a large triangle: its pixel count is its area up to the boundary pixels
    mask = prep.polygon_mask([[10.3, 5.1, 190.7, 40.2, 60.4, 170.9]], 200, 200)
    x, y = np.array([10.3, 190.7, 60.4]), np.array([5.1, 40.2, 170.9])
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    assert abs(mask.sum() - area) < 0.01 * area


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


def write_download(root, annotations_train=None):
    """train2014/ (3 images, one without annotations), val2014/ (1 image), annotations/."""
    images = {
        "train": [(1, "COCO_train2014_000000000001.jpg", 10, 12),
                  (2, "COCO_train2014_000000000002.jpg", 6, 7),
                  (3, "COCO_train2014_000000000003.jpg", 5, 5)],
        "val": [(42, "COCO_val2014_000000000042.jpg", 8, 8)],
    }
    if annotations_train is None:
        annotations_train = [
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 12.0,
             "segmentation": [[2, 2, 6, 2, 6, 5, 2, 5]]},
            {"id": 12, "image_id": 1, "category_id": 90, "iscrowd": 1, "area": 24,
             "segmentation": {"counts": encode_counts(block(10, 12, slice(0, 6), slice(0, 4))),
                              "size": [10, 12]}},
            {"id": 13, "image_id": 1, "category_id": 90, "iscrowd": 0, "area": 10.0,
             "segmentation": {"counts": counts_to_string(encode_counts(
                 block(10, 12, slice(7, 9), slice(6, 11)))), "size": [10, 12]}},
            {"id": 14, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [[7, 8, 12, 8, 12, 10, 7, 10]]},
            # image 2: one object in two parts
            {"id": 21, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 13.0,
             "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2], [4, 3, 7, 3, 7, 6, 4, 6]]},
        ]
    annotations = {
        "train": annotations_train,
        "val": [{"id": 51, "image_id": 42, "category_id": 90, "iscrowd": 0,
                 "area": float(val_object().sum()),
                 "segmentation": {"counts": counts_to_string(encode_counts(val_object())),
                                  "size": [8, 8]}}],
    }
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split in ("train", "val"):
        folder = os.path.join(root, f"{split}2014")
        os.makedirs(folder, exist_ok=True)
        records = []
        for image_id, file_name, height, width in images[split]:
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, file_name))
            records.append({"id": image_id, "file_name": file_name, "height": height,
                            "width": width})
        content = {"images": records, "annotations": annotations[split],
                   "categories": CATEGORIES}
        with open(os.path.join(root, "annotations", f"instances_{split}2014.json"), "w") as f:
            json.dump(content, f)


def read(path):
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


@pytest.fixture
def download(tmp_path):
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


def test_missing_image_folder(tmp_path, capsys):
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
    ({"counts": "5X1 2", "size": [10, 12]}, "holds ' '"),
    ({"counts": [120], "size": [12, 10]}, "not the image's"),
    ([[1, 2, 3, 4, 5]], "polygon must be"),
    ("person", "segmentation must be"),
])
def test_malformed_annotation_names_its_id(tmp_path, capsys, segmentation, problem):
    root = str(tmp_path / "coco2014")
    write_download(root, annotations_train=[
        {"id": 11, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 6, 2, 6, 5]]},
        {"id": 777, "image_id": 1, "category_id": 1, "segmentation": segmentation}])
    message = error_of(capsys, ["--coco-root", root, "--out", str(tmp_path / "o"),
                                "--workers", "1"])
    assert "annotation id 777" in message and problem in message
    assert "COCO_train2014_000000000001.jpg" in message and "fix or remove" in message


def test_unknown_category_and_foreign_names(tmp_path, capsys):
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
