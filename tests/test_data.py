"""Tests of data.py on tiny data sets written into tmp_path: readers, labels, caches,
augmentation alignment, and one clear error per kind of bad input."""

import gc
import logging
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data

MEAN = np.asarray(data.IMAGENET_MEAN, dtype=np.float32)
STD = np.asarray(data.IMAGENET_STD, dtype=np.float32)


# --- helpers that write data sets -------------------------------------------------------------
def save_mask(path, ids, mode="P"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mask = Image.fromarray(np.asarray(ids, dtype=np.uint8))  # "L"
    if mode == "P":
        mask.putpalette(data.voc_palette())
    mask.save(path)


def save_image(path, image, format="JPEG"):
    """`format="PNG"` stores lossless content under the .jpg name (PIL reads by content), for
    tests that need exact pixel values or modes JPEG cannot hold."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, format=format)


def write_list(root, split, names):
    folder = os.path.join(root, "ImageSets", "Segmentation")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, split + ".txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))


def voc_item(root, name, image, ids, mask_mode="P", format="JPEG"):
    save_image(os.path.join(root, "JPEGImages", name + ".jpg"), image, format)
    save_mask(os.path.join(root, "SegmentationClassAug", name + ".png"), ids, mask_mode)


def simple_voc(root, names=("a", "b"), split="val", size=(12, 16), class_id=3):
    rng = np.random.default_rng(0)
    for name in names:
        ids = np.zeros(size, dtype=np.uint8)
        ids[2:6, 3:9] = class_id
        voc_item(root, name, rng.integers(0, 256, size + (3,), dtype=np.uint8), ids)
    write_list(root, split, names)


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def pixels(item):
    """The item's image back on the 0–255 scale: (H, W, 3) float."""
    return item["image"].numpy().transpose(1, 2, 0) * STD + MEAN


def dataset(root, split="val", train=False, cache_dir=None, **kw):
    return data.SegmentationDataset(root=str(root), split=split, num_classes=21, train=train,
                                    cache_dir=None if cache_dir is None else str(cache_dir), **kw)


# --- constants ----------------------------------------------------------------------------
def test_class_names_and_palette():
    assert len(data.VOC_CLASSES) == 21 and data.VOC_CLASSES[15] == "person"
    assert len(data.COCO_CLASSES) == 81 and data.COCO_CLASSES[1] == "person"
    assert data.COCO_CLASSES[80] == "toothbrush" and len(set(data.COCO_CLASSES)) == 81
    assert len(data.SYNTHETIC_CLASSES) == 6 and data.SYNTHETIC_CLASSES[0] == "background"
    palette = np.asarray(data.voc_palette()).reshape(256, 3)
    # the colours of VOC's own PNGs: background, aeroplane, bicycle, person, void
    assert palette[[0, 1, 2, 15, 255]].tolist() == [
        [0, 0, 0], [128, 0, 0], [0, 128, 0], [192, 128, 128], [224, 224, 192]]
    assert len({tuple(c) for c in palette}) == 256


# --- the VOC reader -------------------------------------------------------------------------
def test_voc_reader_image_modes_masks_and_odd_sizes(tmp_path):
    root, rng = tmp_path / "VOC2012", np.random.default_rng(1)
    h, w = 37, 53
    masks = {}

    def ids(*classes):
        mask = np.zeros((h, w), dtype=np.uint8)
        for k, c in enumerate(classes):
            mask[3 + 8 * k : 10 + 8 * k, 5:40] = c
        mask[0, :] = 255
        return mask

    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    sixteen = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    items = {  # name: (image, mask ids, mask mode, image file format)
        "rgb_palette": (rgb, ids(3, 20), "P", "JPEG"),
        "gray_gray": (Image.fromarray(rgb[:, :, 0]), ids(7), "L", "JPEG"),
        "cmyk": (Image.fromarray(rgb).convert("CMYK"), ids(1), "P", "JPEG"),
        "rgba": (Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])), ids(2), "L", "PNG"),
        "sixteen": (Image.fromarray(sixteen), ids(15, 4), "P", "PNG"),
    }
    for name, (image, mask, mode, fmt) in items.items():
        voc_item(root, name, image, mask, mode, fmt)
        masks[name] = mask
    write_list(root, "val", list(items))
    assert Image.open(root / "JPEGImages" / "sixteen.jpg").mode == "I;16"
    assert Image.open(root / "JPEGImages" / "cmyk.jpg").mode == "CMYK"

    ds = dataset(root, cache_dir=tmp_path / "cache")
    assert len(ds) == len(items)
    for index, name in enumerate(ds.names):
        item = ds[index]
        assert item["name"] == name
        assert item["image"].shape == (3, h, w) and item["image"].dtype == torch.float32
        assert item["label"].dtype == torch.int64
        assert np.array_equal(item["label"].numpy(), masks[name])  # val: the mask, untouched
        assert item["valid_box"].tolist() == [0, h, 0, w] and item["valid_box"].dtype == torch.int64
        expected = np.zeros(20, dtype=np.float32)
        expected[[c - 1 for c in np.unique(masks[name]) if 0 < c < 255]] = 1
        assert item["cls_labels"].dtype == torch.float32
        assert np.array_equal(item["cls_labels"].numpy(), expected)
        rgb_back = pixels(item)
        path = root / "JPEGImages" / (name + ".jpg")
        if name == "sixteen":  # 16-bit range scaled to 8 bits, not clipped at 255
            expected_rgb = np.repeat(np.rint(sixteen / 257.0)[:, :, None], 3, axis=2)
        elif name == "rgba":
            expected_rgb = rgb  # alpha dropped
        else:
            expected_rgb = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_allclose(rgb_back, expected_rgb, atol=1e-3)
    gray = pixels(ds[ds.names.index("gray_gray")])
    assert np.allclose(gray[:, :, 0], gray[:, :, 1], atol=1e-3)


def test_voc_root_resolution(tmp_path):
    voc = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    simple_voc(voc)
    for given in (tmp_path / "data", tmp_path / "data" / "VOCdevkit", voc):
        assert dataset(given).root == str(voc)


def test_train_aug_is_derived_from_the_masks_minus_val(tmp_path):
    root, cache = tmp_path / "voc", tmp_path / "cache"
    simple_voc(root, names=("d", "b", "a", "c", "e"), split="train")
    write_list(root, "val", ["b", "e"])
    before = files_under(root)
    ds = dataset(root, split="train_aug", train=True, cache_dir=cache, crop_size=8)
    assert ds.names == ["a", "c", "d"]
    derived = [f for f in os.listdir(cache) if f.endswith(".txt")]
    assert len(derived) == 1 and "train_aug" in derived[0]
    assert (cache / derived[0]).read_text().split() == ["a", "c", "d"]
    assert files_under(root) == before  # nothing written into the data set
    # Without a cache it is derived in memory, still nothing written into the data set.
    assert dataset(root, split="train_aug").names == ["a", "c", "d"]
    assert files_under(root) == before


def test_image_level_labels_are_cached_outside_the_dataset(tmp_path, monkeypatch):
    root, cache = tmp_path / "voc", tmp_path / "cache"
    simple_voc(root, names=("a", "b", "c"), class_id=9)
    before = files_under(root)
    first = dataset(root, cache_dir=cache)
    assert first.cls_labels.shape == (3, 20) and first.cls_labels[:, 8].all()
    assert first.cls_labels.sum() == 3
    assert files_under(root) == before and any(f.endswith(".npz") for f in os.listdir(cache))

    def no_reading(path):
        raise AssertionError(f"mask {path} read again")

    monkeypatch.setattr(data, "read_mask", no_reading)
    second = dataset(root, cache_dir=cache)  # instant: the masks are not read again
    assert np.array_equal(second.cls_labels, first.cls_labels) and second.names == first.names
    # A changed split list is a new key: the labels are derived again (and here fail).
    write_list(root, "val", ["a", "b"])
    os.utime(root / "ImageSets" / "Segmentation" / "val.txt", ns=(1, 1))
    with pytest.raises(AssertionError, match="read again"):
        dataset(root, cache_dir=cache)


def coco_item(root, split, name, ids, rng):
    height, width = ids.shape
    save_image(root / "JPEGImages" / split / (name + ".jpg"),
               rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    save_mask(str(root / "SegmentationClass" / split / (name + ".png")), ids)


def test_coco_layout_with_81_classes(tmp_path):
    root, rng = tmp_path / "coco", np.random.default_rng(2)
    for split, names, classes in (("train", ["t1", "t2"], (80, 1)), ("val", ["v1"], (45, 46))):
        for name, c in zip(names, classes):
            ids = np.zeros((20, 30), dtype=np.uint8)
            ids[5:15, 5:15] = c
            coco_item(root, split, name, ids, rng)
        write_list(root, split, names)
    train = data.build_dataset("COCO", str(root), "train", train=True, crop_size=16,
                               cache_dir=str(tmp_path / "cache"))
    assert all(f.startswith("coco-train-") for f in os.listdir(tmp_path / "cache"))
    assert train.num_classes == 81 and train.cls_labels.shape == (2, 80)
    assert train.cls_labels[train.names.index("t1"), 79] == 1
    item = train[0]
    assert item["image"].shape == (3, 16, 16) and item["cls_labels"].shape == (80,)
    # Without a list, a COCO split is every mask of its folder.
    os.remove(root / "ImageSets" / "Segmentation" / "val.txt")
    val = data.build_dataset("coco2014", str(root), "val", train=False)
    assert val.names == ["v1"] and np.flatnonzero(val.cls_labels[0]).tolist() == [44]
    assert val[0]["image"].shape == (3, 20, 30)


def test_coco_skips_images_without_annotation_for_val_as_the_release_lists(tmp_path, caplog):
    """The release's COCO lists hold only images with a labelled object (40,137 of 40,504 val
    images): a mask of background and ignore only is left out of evaluation too, in one line."""
    root, rng = tmp_path / "coco", np.random.default_rng(5)
    annotated = np.zeros((20, 30), dtype=np.uint8)
    annotated[5:15, 5:15] = 45
    crowd_only = np.zeros((20, 30), dtype=np.uint8)
    crowd_only[5:15, 5:15] = 255
    for split in ("train", "val"):
        for name, ids in (("a", annotated), ("b", np.zeros((20, 30), np.uint8)),
                          ("c", crowd_only), ("d", np.where(annotated > 0, 80, 0).astype(np.uint8))):
            coco_item(root, split, name, ids, rng)
    for split, train in (("val", False), ("train", True)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="data"):
            ds = data.build_dataset("coco", str(root), split, train=train, crop_size=16)
        assert ds.names == ["a", "d"] and len(ds) == 2
        assert np.flatnonzero(ds.cls_labels[0]).tolist() == [44]
        assert np.flatnonzero(ds.cls_labels[1]).tolist() == [79]
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and lines[0].startswith(f"2 of 4 images of split '{split}' "), lines
        assert "no foreground class" in lines[0] and "\n" not in lines[0]
    assert [item["name"] for item in ds] == ["a", "d"]


def test_caches_and_progress_are_named_after_the_data_set(tmp_path, capsys):
    root = tmp_path / "set"
    simple_voc(root, split="train")
    for name, key in (("synthetic", "synthetic"), ("VOC2012", "voc")):
        cache = tmp_path / f"cache_{key}"
        data.build_dataset(name, str(root), "train", train=True, crop_size=8, cache_dir=str(cache))
        err = capsys.readouterr().err
        assert f"image-level labels of {key} train" in err, err
        assert os.listdir(cache) and all(f.startswith(key + "-") for f in os.listdir(cache))


def test_build_dataset_names(tmp_path):
    simple_voc(tmp_path / "voc")
    assert data.build_dataset("VOC2012", str(tmp_path / "voc"), "val", train=False).num_classes == 21
    assert data.build_dataset("synthetic", str(tmp_path / "voc"), "val", train=False).num_classes == 6
    with pytest.raises(ValueError, match="name"):
        data.build_dataset("imagenet", str(tmp_path / "voc"), "val", train=False)


# --- augmentation -----------------------------------------------------------------------------
def colour_of(ids):
    """A distinct colour per class id, so the image itself says which label lies under it."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids * 12, 255 - ids * 12, (ids * 53) % 256], axis=-1).astype(np.float64)


def id_of(rgb):
    """Nearest class id (1..20) of each pixel's colour."""
    table = colour_of(np.arange(1, 21))  # (20, 3)
    distance = ((rgb[:, :, None, :] - table[None, None]) ** 2).sum(-1)  # (H, W, 20)
    return distance.argmin(-1) + 1


def test_augmentation_keeps_image_and_valid_box_aligned(tmp_path):
    root, rng, block = tmp_path / "voc", np.random.default_rng(3), 10
    blocks = rng.integers(1, 21, (4, 6))
    ids = np.kron(blocks, np.ones((block, block), dtype=np.int64)).astype(np.uint8)  # (40, 60)
    voc_item(root, "pattern", colour_of(ids).astype(np.uint8), ids, format="PNG")
    write_list(root, "train", ["pattern"])
    crop = 64
    ds = dataset(root, split="train", train=True, crop_size=crop)
    black = (-MEAN / STD)[:, None]  # a padded pixel: 0 before normalisation, (3, 1)
    tops, lefts, flipped_seen, checked = set(), set(), False, 0
    for seed in range(40):
        torch.manual_seed(seed)
        item = ds[0]
        assert "label" not in item  # training learns from image-level labels alone
        image = item["image"].numpy()
        top, bottom, left, right = item["valid_box"].tolist()
        assert image.shape == (3, crop, crop)
        assert 0 <= top < bottom <= crop and 0 <= left < right <= crop  # crop coordinates
        inside = np.zeros((crop, crop), dtype=bool)
        inside[top:bottom, left:right] = True
        assert np.allclose(image[:, ~inside], black, atol=1e-5)
        rgb = image.transpose(1, 2, 0) * STD + MEAN
        assert (rgb[inside][:, 0] > 11).all()  # every block colour has red >= 12, blends too
        # Away from block edges (bilinear blends there) each pixel has a block's own colour.
        seen = id_of(rgb)
        window = np.lib.stride_tricks.sliding_window_view(np.pad(seen, 2, constant_values=-1), (5, 5))
        uniform = (window == seen[:, :, None, None]).all(axis=(2, 3)) & inside
        assert np.abs(rgb[uniform] - colour_of(seen[uniform])).max() < 1.0
        checked += uniform.sum()
        tops.add(top)
        lefts.add(left)
        # Left-right order of the block columns, along the row with most block-coloured pixels,
        # tells a flip apart.
        y = int(uniform.sum(1).argmax())
        row = seen[y][uniform[y]]
        columns = [c for i, c in enumerate(row) if i == 0 or c != row[i - 1]]
        flipped_seen |= bool(columns) and columns[0] not in blocks[:, 0] and columns[-1] in blocks[:, 0]
    assert checked > 40 * 200
    # The release places a smaller image at a random offset inside the padded canvas.
    assert len(tops) > 3 and len(lefts) > 3
    assert flipped_seen


def test_training_items_read_no_mask(tmp_path, monkeypatch):
    """The image-level labels come from the cache made at start-up; an item reads its image."""
    simple_voc(tmp_path, split="train")
    ds = dataset(tmp_path, split="train", train=True, crop_size=8)

    def no_reading(path):
        raise AssertionError(f"mask {path} read for a training item")

    monkeypatch.setattr(data, "read_mask", no_reading)
    item = ds[0]
    assert sorted(item) == ["cls_labels", "image", "name", "valid_box"]


def test_augmentation_known_answer_and_reproducibility(tmp_path):
    root, rng = tmp_path / "voc", np.random.default_rng(4)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    ids = rng.integers(0, 21, (37, 53)).astype(np.uint8)
    voc_item(root, "x", image, ids, format="PNG")
    write_list(root, "train", ["x"])
    scale, crop = 1.5, 100
    fixed = dataset(root, split="train", train=True, crop_size=crop, rescale_range=(scale, scale), flip=False)
    item = fixed[0]
    top, bottom, left, right = item["valid_box"].tolist()
    size = (int(scale * 53), int(scale * 37))  # (W, H), truncated as the release
    assert (bottom - top, right - left) == (size[1], size[0])
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    np.testing.assert_allclose(pixels(item)[top:bottom, left:right], resized, atol=1e-3)

    ds = dataset(root, split="train", train=True, crop_size=32)
    torch.manual_seed(7)
    first = ds[0]
    torch.manual_seed(7)
    again = ds[0]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["valid_box"], again["valid_box"])
    different = [ds[0]["valid_box"].tolist() for _ in range(5)] + [first["valid_box"].tolist()]
    assert len(set(map(tuple, different))) > 1


# --- errors: each names the file ----------------------------------------------------------------
def test_error_root_missing(tmp_path):
    with pytest.raises(data.DatasetError, match="nowhere.*JPEGImages"):
        dataset(tmp_path / "nowhere")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(data.DatasetError, match="empty.*has no JPEGImages"):
        dataset(tmp_path / "empty")


def test_error_voc_without_the_sbd_masks(tmp_path):
    """Plain VOC 2012 (SegmentationClass only): the SBD-augmented masks are named as missing,
    with where to get them, whichever split is asked for."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    simple_voc(voc, split="train")
    write_list(voc, "val", ["a"])
    os.rename(voc / "SegmentationClassAug", voc / "SegmentationClass")
    for split in ("train_aug", "train", "val"):
        with pytest.raises(data.DatasetError) as raised:
            data.build_dataset("VOC2012", str(tmp_path), split, train=split != "val")
        message = str(raised.value)
        assert "\n" not in message
        assert re.match(rf"{re.escape(str(voc))} has no SegmentationClassAug folder: the "
                        r"SBD-augmented masks .* are missing", message), message
        assert "SegmentationClassAug.zip" in message and "host.robots.ox.ac.uk" in message
    # COCO's images without their converted masks: the same kind of line.
    save_image(tmp_path / "coco" / "JPEGImages" / "val" / "v.jpg", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(data.DatasetError, match=r"coco has no SegmentationClass folder: the "
                       r"VOC-style masks are missing: convert .*instances_\{train,val\}2014\.json"):
        data.build_dataset("coco", str(tmp_path / "coco"), "val", train=False)


def test_error_split_list_missing(tmp_path):
    simple_voc(tmp_path, split="train")
    with pytest.raises(data.DatasetError, match=r"val\.txt not found.*available: \['train'\]"):
        dataset(tmp_path, split="val")


def test_error_split_list_empty(tmp_path):
    simple_voc(tmp_path)
    write_list(tmp_path, "val", [])
    with pytest.raises(data.DatasetError, match=r"val\.txt is empty"):
        dataset(tmp_path)


def test_error_image_missing(tmp_path):
    simple_voc(tmp_path)
    os.remove(tmp_path / "JPEGImages" / "b.jpg")
    with pytest.raises(data.DatasetError, match=r"image .*JPEGImages/b\.jpg listed .* missing"):
        dataset(tmp_path)


def test_error_mask_missing(tmp_path):
    simple_voc(tmp_path)
    os.remove(tmp_path / "SegmentationClassAug" / "a.png")
    with pytest.raises(data.DatasetError, match=r"mask .*SegmentationClassAug/a\.png listed .* missing"):
        dataset(tmp_path)


def test_error_corrupt_or_truncated_jpeg(tmp_path):
    simple_voc(tmp_path, size=(64, 64))
    (tmp_path / "JPEGImages" / "b.jpg").write_bytes(b"not a jpeg at all")
    # Its header is read at start-up, where its mask's size is checked against it.
    with pytest.raises(data.DatasetError, match=r"cannot decode image .*b\.jpg"):
        dataset(tmp_path)
    simple_voc(tmp_path, size=(64, 64))
    path = tmp_path / "JPEGImages" / "a.jpg"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])  # truncated: its header is whole
    ds = dataset(tmp_path)
    with pytest.raises(data.DatasetError, match=r"cannot decode image .*a\.jpg"):
        ds[0]
    # In a DataLoader worker the error reaches the main process with the file's name. (Shutting
    # down a worker that raised takes torch's 5 s join timeout; it is spent here, not in a later
    # test, because no traceback keeps the iterator alive.)
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1))
    try:
        next(batches)
        message = "no error"
    except data.DatasetError as error:
        message = str(error)
    del batches
    gc.collect()
    assert re.search(r"cannot decode image .*a\.jpg", message), message


def test_error_file_gone_or_unreadable_after_start(tmp_path, monkeypatch):
    simple_voc(tmp_path)
    ds = dataset(tmp_path)
    os.remove(tmp_path / "JPEGImages" / "a.jpg")
    with pytest.raises(data.DatasetError, match=r"^image \S*/JPEGImages/a\.jpg is missing \(it was "
                       r"there at start-up\): extract the data set again"):
        ds[0]

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data.Image, "open", denied)
    with pytest.raises(data.DatasetError, match=r"^cannot read mask \S*/b\.png: Permission denied; "
                       r"make it a file readable"):
        data.read_mask(str(tmp_path / "SegmentationClassAug" / "b.png"))


@pytest.mark.parametrize("train", [False, True])
def test_error_mask_size_mismatch_at_start_up(tmp_path, train):
    """Where the image-level labels are derived, before any step: training reads no mask later."""
    simple_voc(tmp_path, split="train")
    save_mask(str(tmp_path / "SegmentationClassAug" / "b.png"), np.zeros((12, 15), dtype=np.uint8) + 3)
    with pytest.raises(data.DatasetError, match=r"mask .*b\.png is 15×12 .* image .*b\.jpg is 16×12"):
        dataset(tmp_path, split="train", train=train, crop_size=8)


def test_error_mask_size_mismatch_after_the_labels_were_cached(tmp_path):
    simple_voc(tmp_path)
    ds = dataset(tmp_path, cache_dir=tmp_path / "cache")
    save_mask(str(tmp_path / "SegmentationClassAug" / "b.png"), np.zeros((12, 15), dtype=np.uint8) + 3)
    ds = dataset(tmp_path, cache_dir=tmp_path / "cache")   # the cached labels: no mask read
    with pytest.raises(data.DatasetError, match=r"mask .*b\.png is 15×12 .* image .*b\.jpg is 16×12"):
        ds[1]


def test_error_bad_mask_ids(tmp_path):
    simple_voc(tmp_path)
    ids = np.zeros((12, 16), dtype=np.uint8)
    ids[0, 0], ids[1, 1], ids[2, 2] = 21, 40, 255
    save_mask(str(tmp_path / "SegmentationClassAug" / "b.png"), ids, mode="L")
    with pytest.raises(data.DatasetError, match=r"b\.png has class ids \[21, 40\] outside 0\.\.20 "
                       r"\(and 255 for ignore\); is num_classes=21 right .*COCO 81"):
        dataset(tmp_path)


def test_error_rgb_mask(tmp_path):
    simple_voc(tmp_path)
    Image.fromarray(np.zeros((12, 16, 3), dtype=np.uint8)).save(tmp_path / "SegmentationClassAug" / "a.png")
    with pytest.raises(data.DatasetError, match=r"a\.png has mode RGB: masks must be index masks"):
        dataset(tmp_path)


def test_images_without_foreground_are_skipped_for_training(tmp_path, caplog):
    simple_voc(tmp_path, names=("a", "b", "c", "d"), split="train")
    for name in ("b", "d"):
        ids = np.zeros((12, 16), dtype=np.uint8)
        ids[0] = 255
        save_mask(str(tmp_path / "SegmentationClassAug" / (name + ".png")), ids)
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = dataset(tmp_path, split="train", train=True, crop_size=8)
    assert ds.names == ["a", "c"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 4 images" in warnings[0].getMessage()
    # VOC's val list is the official one: evaluation keeps them all, as the release does.
    assert len(dataset(tmp_path, split="train", train=False)) == 4
    write_list(tmp_path, "train", ["b", "d"])
    with pytest.raises(data.DatasetError, match=r"no image of split 'train' in \S+ has a foreground"):
        dataset(tmp_path, split="train", train=True, crop_size=8)
