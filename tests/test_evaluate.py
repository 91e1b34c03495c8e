"""evaluate.py: the mIoU, the test-time protocol, the dense CRF, the pseudo-label table, inference
on image files, the figures and the command line (on a tiny synthetic set and checkpoint)."""
import dataclasses
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import evaluate
import metrics
import config
import pipeline
import synthetic
import train
import visualize
from evaluate import multi_scale_seg_logits
from metrics import confusion_matrix, segmentation_scores
from pipeline import LabelSettings
from attention_affinity import window_mask
from cam import multi_scale_cam
from model import AFANet
from pretrained import afanet_to_release
from par import PAR
from random_walk import propagate
from visualize import connected_components, largest_object_centre

HAS_CRF = importlib.util.find_spec("pydensecrf") is not None
NUM_CLASSES = len(data.SYNTHETIC_CLASSES)
SIZE = 64


# --- the metric ------------------------------------------------------------------------------------
def naive_confusion(pred, target, num_classes, ignore_index=255):
    conf = np.zeros((num_classes, num_classes), np.int64)
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t != ignore_index and p != ignore_index:
            conf[t, p] += 1
    return conf


def test_confusion_matrix_matches_naive_count():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (3, 9, 7), generator=g)
    pred = torch.randint(0, 5, (3, 9, 7), generator=g)
    target[0, :2] = 255
    pred[1, 3:5] = 255
    assert np.array_equal(confusion_matrix(pred, target, 5).numpy(), naive_confusion(pred, target, 5))


def test_miou_perfect_and_all_wrong():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 255]])
    perfect = segmentation_scores(confusion_matrix(target.clone(), target, 3))
    assert perfect["mIoU"] == 1.0 and perfect["pAcc"] == 1.0 and perfect["mAcc"] == 1.0
    wrong = (target + 1) % 3
    scores = segmentation_scores(confusion_matrix(wrong, target, 3))
    assert scores["mIoU"] == 0.0 and scores["pAcc"] == 0.0


def test_miou_known_answer_absent_classes_and_ignore():
    # Class 3 is absent from the truth and never predicted: left out of the mean (NaN).
    # Class 2 is absent from the truth but predicted once: left out of the mean, yet its false
    # positive lowers class 1's IoU. 255 in the truth is ignored whatever is predicted there.
    target = torch.tensor([0, 0, 0, 1, 1, 255, 255])
    pred = torch.tensor([0, 0, 1, 1, 2, 3, 0])
    s = segmentation_scores(confusion_matrix(pred, target, 4))
    iou_0 = 2 / 3                  # TP 2, FN 1
    iou_1 = 1 / 3                  # TP 1, FP 1 (from class 0), FN 1 (predicted as 2)
    assert s["IoU"][0] == pytest.approx(iou_0) and s["IoU"][1] == pytest.approx(iou_1)
    assert math.isnan(s["IoU"][2]) and math.isnan(s["IoU"][3])
    assert s["mIoU"] == pytest.approx((iou_0 + iou_1) / 2)
    assert s["pAcc"] == pytest.approx(3 / 5)
    assert s["mAcc"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_ignored_prediction_is_not_scored():
    """A pseudo label's ignore band (255 in the prediction) is left out, as the release's
    pseudo_scores does; the labelled pixels decide the score."""
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 255, 255, 1])
    assert segmentation_scores(confusion_matrix(pred, target, 2))["mIoU"] == 1.0


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([5]), torch.tensor([0]), 2)


# --- multi-scale + flip inference ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return AFANet(NUM_CLASSES, backbone="mit_b0").eval()


def release_order_logits(model, image, scales, long_side):
    """The authors' test script, transcribed literally for one image: scale 1 first (its logit
    grid is the reference), the other scales resized to it, flips averaged, max over scales."""
    H, W = image.shape[-2:]
    ratio = long_side / max(H, W)
    x = F.interpolate(image, size=(int(H * ratio), int(W * ratio)), mode="bilinear",
                      align_corners=False)
    segs = model(torch.cat([x, x.flip(-1)])).seg_logits
    h, w = segs.shape[-2:]
    per_scale = [(segs[0] + segs[1].flip(-1)) / 2]
    for s in scales:
        if s != 1.0:
            xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            segs = F.interpolate(model(torch.cat([xs, xs.flip(-1)])).seg_logits, size=(h, w),
                                 mode="bilinear", align_corners=False)
            per_scale.append((segs[0] + segs[1].flip(-1)) / 2)
    best = torch.stack(per_scale).max(0).values[None]
    return F.interpolate(best, size=(H, W), mode="bilinear", align_corners=False)


@torch.no_grad()
def test_multi_scale_matches_release_order(tiny_model):
    torch.manual_seed(1)
    image = torch.randn(1, 3, 45, 70)
    ours = multi_scale_seg_logits(tiny_model, image, scales=(1.0, 0.5, 0.75), long_side=96)
    reference = release_order_logits(tiny_model, image, (1.0, 0.5, 0.75), 96)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # Bilinear resizing is a convex combination, so the max over scales bounds each scale.
    alone = multi_scale_seg_logits(tiny_model, image, scales=(1.0,), long_side=96)
    assert bool((ours >= alone - 1e-5).all())
    assert not torch.allclose(ours, alone)


@torch.no_grad()
@pytest.mark.parametrize("size,long_side", [((67, 83), 0), ((37, 53), 96), ((64, 48), 128)])
def test_multi_scale_output_has_the_image_size(tiny_model, size, long_side):
    image = torch.randn(2, 3, *size)
    logits = multi_scale_seg_logits(tiny_model, image, long_side=long_side)
    assert logits.shape == (2, NUM_CLASSES, *size)
    assert torch.isfinite(logits).all()


def test_multi_scale_rejects_images_too_small_for_the_encoder(tiny_model):
    with pytest.raises(ValueError, match="minimum input side 29"):
        multi_scale_seg_logits(tiny_model, torch.randn(1, 3, 40, 60), long_side=0)


@torch.no_grad()
def test_multi_scale_is_flip_consistent(tiny_model):
    """Each scale averages an image with its mirror, so mirroring the input mirrors the output."""
    torch.manual_seed(2)
    image = torch.randn(1, 3, 64, 80)
    logits = multi_scale_seg_logits(tiny_model, image, long_side=0)
    mirrored = multi_scale_seg_logits(tiny_model, image.flip(-1), long_side=0)
    torch.testing.assert_close(mirrored, logits.flip(-1), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_scale_one_grid_is_the_decoders_output(tiny_model):
    for H, W in ((37, 53), (64, 64)):
        out = tiny_model(torch.randn(1, 3, H, W)).seg_logits
        stride = tiny_model.encoder.strides[0]
        assert out.shape[-2:] == (pipeline.token_grid(H, stride), pipeline.token_grid(W, stride))


# --- dense CRF -------------------------------------------------------------------------------------
def noisy_two_region_case():
    """Left half red, right half blue; the truth follows the colours; the softmax is right with
    probability 0.6 but flipped on a random 30% of the pixels."""
    rng = np.random.default_rng(0)
    H, W = 32, 48
    image = np.zeros((H, W, 3), np.uint8)
    image[:, : W // 2] = (200, 30, 30)
    image[:, W // 2:] = (30, 30, 200)
    truth = np.zeros((H, W), np.int64)
    truth[:, W // 2:] = 1
    noisy = np.where(rng.random((H, W)) < 0.3, 1 - truth, truth)
    probs = np.where(np.arange(2)[:, None, None] == noisy[None], 0.6, 0.4).astype(np.float32)
    return image, probs, truth


@pytest.mark.skipif(not HAS_CRF, reason="pydensecrf2 is not installed")
def test_dense_crf_cleans_a_noisy_prediction():
    image, probs, truth = noisy_two_region_case()
    before = (probs.argmax(0) == truth).mean()
    refined = evaluate.dense_crf(image, probs)
    assert refined.shape == probs.shape
    np.testing.assert_allclose(refined.sum(0), 1, atol=1e-4)
    after = (refined.argmax(0) == truth).mean()
    assert before < 0.75 and after > 0.98


def hide_densecrf(monkeypatch):
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)      # None in sys.modules: import fails


def test_missing_densecrf_says_how_to_install(monkeypatch):
    hide_densecrf(monkeypatch)
    image, probs, _ = noisy_two_region_case()
    with pytest.raises(config.ConfigError, match="pip install pydensecrf2"):
        evaluate.dense_crf(image, probs)


def test_map_in_processes_keeps_the_order():
    items = [(k, 2) for k in range(7)]
    assert list(evaluate.map_in_processes(pow, items, workers=0)) == [k * k for k in range(7)]
    assert list(evaluate.map_in_processes(pow, items, workers=2)) == [k * k for k in range(7)]


# --- the figure's pixel ----------------------------------------------------------------------------
def test_connected_components_and_largest_object_centre():
    label = torch.zeros(20, 20, dtype=torch.long)
    label[1:4, 1:4] = 1                     # a small square of class 1 ...
    label[1:4, 6:9] = 1                     # ... another one, not touching it
    label[8:19, 8:19] = 2                   # a large ring of class 2 (11×11 minus a 5×5 hole)
    label[11:16, 11:16] = 0
    label[10, 2] = 255                      # ignored: never an object
    ids = connected_components(label)
    assert len(ids.unique()) == 4           # background + 3 objects
    assert ids[2, 2] != ids[2, 7] and ids[10, 2] == 0
    assert (ids[label == 2] == ids[8, 8]).all()
    y, x = largest_object_centre(label)
    assert label[y, x] == 2                 # on the ring, not in its hole
    assert abs(y - 13) <= 3 and abs(x - 13) <= 3
    assert largest_object_centre(torch.zeros(6, 8, dtype=torch.long)) == (3, 4)


# --- end to end: a tiny synthetic set and a checkpoint in train.py's format -------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data_root = str(root / "synthetic")
    synthetic.make_synthetic(data_root, num_train=6, num_val=3, size=SIZE)
    torch.manual_seed(0)
    model = AFANet(NUM_CLASSES, backbone="mit_b0")
    cfg = config.Config(**{**config.PRESETS["synthetic"], "data_root": data_root,
                          "val_batch_size": 3, "num_figures": 2, "cam_scales": (1.0, 1.5)})
    checkpoint = str(root / "tiny.pth")
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "step": 0},
               checkpoint)
    return {"root": root, "data_root": data_root, "checkpoint": checkpoint, "cfg": cfg,
            "model": model.eval()}


def assert_one_error_line(err, message):
    """One line "error: ...", no traceback (progress bars may precede it on stderr)."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def run_cli(tiny_run, *flags, out="out"):
    out_dir = str(tiny_run["root"] / out)
    code = evaluate.main(["--checkpoint", tiny_run["checkpoint"], "--out", out_dir,
                          "--workers", "0", "--device", "cpu", *flags])
    return code, out_dir


def assert_png(path, size, mode=None):
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.size == size
        if mode:
            assert image.mode == mode


def test_cli_segmentation_writes_metrics_and_masks(tiny_run, capsys):
    masks = str(tiny_run["root"] / "masks")
    code, out_dir = run_cli(tiny_run, "--long-side", "96", "--save-masks", masks, out="seg")
    assert code == 0
    with open(os.path.join(out_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["split"] == "val" and metrics["scales"] == [1.0, 0.5, 0.75]
    assert 0 <= metrics["mIoU"] <= 1 and set(metrics["IoU"]) == set(data.SYNTHETIC_CLASSES)
    printed = capsys.readouterr().out
    assert "| background |" in printed and "mIoU" in printed
    names = sorted(f for f in os.listdir(masks) if f.endswith(".png"))
    assert names == [f"syn_{k:06d}.png" for k in range(6, 9)]
    # The mask's values are the arg-max of the test-time logits (palette PNG, ids kept).
    dataset = evaluate.load_split(tiny_run["cfg"], "val", None)
    sample = dataset[0]
    expected = multi_scale_seg_logits(tiny_run["model"], sample["image"][None], long_side=96)
    with Image.open(os.path.join(masks, names[0])) as mask:
        assert mask.mode == "P" and mask.size == (SIZE, SIZE)
        assert np.array_equal(np.asarray(mask), expected.argmax(1)[0].numpy())
    assert_png(os.path.join(masks, "overlay", names[0]), (SIZE, SIZE), "RGB")


def test_cli_pseudo_table(tiny_run, capsys):
    code, out_dir = run_cli(tiny_run, "--pseudo", out="pseudo")
    assert code == 0
    with open(os.path.join(out_dir, "metrics.json")) as f:
        metrics = json.load(f)
    keys = ("cam_miou", "par_miou", "walk_miou", "afa_miou", "seg_miou")
    assert metrics["pseudo_split"] == "train"
    assert all(0 <= metrics[k] <= 1 for k in keys)
    assert metrics["pseudo_labelled"]["cam"] == 1.0          # the CAM label labels every pixel
    assert "mIoU" not in metrics                             # the seg table was not asked for
    printed = capsys.readouterr().out
    assert "afa: AFA + PAR, the training label" in printed and "par: CAM + PAR" in printed


@torch.no_grad()
def test_pseudo_labels_are_the_training_labels_and_validation_agrees(tiny_run):
    """The table measures exactly what the training step makes (make_pseudo_labels), and its
    CAM / seg scores are the in-training validation's."""
    cfg, model = tiny_run["cfg"], tiny_run["model"]
    dataset = evaluate.load_split(cfg, "train", None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    par = PAR(num_iter=cfg.par_iters)
    batch = next(iter(loader))
    images, cls_labels = batch["image"], batch["cls_labels"]
    B, _, H, W = images.shape
    box = torch.tensor([[0, H, 0, W]] * B)
    settings = pipeline.LabelSettings.from_config(cfg, model)
    labels = pipeline.make_pseudo_labels(
        model, par, {"image": images, "cls_labels": cls_labels, "valid_box": box}, settings)
    one = torch.utils.data.Subset(dataset, range(B))
    conf = {k: confusion_matrix(v, batch["label"], NUM_CLASSES)
            for k, v in (("par", labels.par), ("afa", labels.afa))}
    result = evaluate.pseudo_label_quality(
        model, par, torch.utils.data.DataLoader(one, batch_size=B), NUM_CLASSES, "cpu", settings)
    for k in conf:
        assert result[f"{k}_miou"] == pytest.approx(segmentation_scores(conf[k])["mIoU"])
    valid = int((batch["label"] != 255).sum())
    assert result["labelled"]["par"] == pytest.approx(int(conf["par"].sum()) / valid)

    scores = metrics.validate(model, loader, NUM_CLASSES, "cpu", settings)
    full = evaluate.pseudo_label_quality(model, par, loader, NUM_CLASSES, "cpu", settings)
    for k in ("cam", "seg"):
        assert full[f"{k}_miou"] == pytest.approx(scores[f"{k}_miou"])


def release_validation_afa_label(model, images, cls_labels, scales, radius=8, bkg_score=0.35):
    """The release's validation, transcribed for the AFA-propagated label: multi-scale CAMs
    resized to ⌈H/16⌉ × ⌈W/16⌉ (its get_down_size) and walked with the affinity of the eval-mode
    forward at scale 1.0 (its attn_pred), background `bkg_score`, all present classes kept."""
    H, W = images.shape[-2:]
    attn_pred = model(images).affinity
    cams, _ = multi_scale_cam(model, images, scales)
    h = H // 16 + 1 - (H % 16 == 0)
    w = W // 16 + 1 - (W % 16 == 0)
    small = F.interpolate(cams, size=(h, w), mode="bilinear", align_corners=False)
    walked = propagate(small * cls_labels[:, :, None, None], attn_pred, window_mask(h, w, radius),
                       cls_labels, bkg_score)
    return F.interpolate(walked, size=(H, W), mode="bilinear", align_corners=False).argmax(1)


@torch.no_grad()
def test_validation_walks_with_the_eval_forward_affinity_at_scale_one(tiny_run):
    """As the release's validation: the affinity of the eval-mode scale-1.0 forward on its
    ⌈H/16⌉ grid, not the largest CAM scale's affinity that training walks with."""
    cfg, model = tiny_run["cfg"], tiny_run["model"]
    dataset = evaluate.load_split(cfg, "val", None)
    torch.manual_seed(3)
    images = torch.cat([dataset[0]["image"][None], torch.randn(1, 3, SIZE, SIZE)])[:, :, :56, :]
    cls_labels = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 1]])
    settings = LabelSettings.from_config(cfg, model)
    _, labels = metrics.validation_labels(model, images, cls_labels, settings)
    expected = release_validation_afa_label(model, images, cls_labels, cfg.cam_scales, cfg.radius,
                                            cfg.low)
    assert torch.equal(labels["walk"], expected)
    # validate() scores exactly these labels
    batch = {"image": images, "label": expected, "cls_labels": cls_labels}
    scores = metrics.validate(model, [batch], NUM_CLASSES, "cpu", settings)
    assert scores["walk_miou"] == 1.0


def test_cli_image_file_and_folder(tiny_run):
    folder = tiny_run["root"] / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    Image.fromarray(rng.integers(0, 255, (60, 40), dtype=np.uint8)).save(folder / "gray.png")
    (folder / "notes.txt").write_text("not an image")
    code, out_dir = run_cli(tiny_run, "--image", str(folder), "--long-side", "128", out="photos_out")
    assert code == 0
    predictions = os.path.join(out_dir, "predictions")
    for name, size in (("wide", (70, 40)), ("gray", (40, 60))):
        assert_png(os.path.join(predictions, name + ".png"), size, "P")
        assert_png(os.path.join(predictions, "overlay", name + ".png"), size, "RGB")
    code, out_dir = run_cli(tiny_run, "--image", str(folder / "wide.jpg"), "--long-side", "128",
                            out="one_out")
    assert code == 0
    assert sorted(os.listdir(os.path.join(out_dir, "predictions"))) == ["overlay", "wide.png"]


def test_cli_figures(tiny_run):
    code, out_dir = run_cli(tiny_run, "--figures", "--num-figures", "1", out="figs")
    assert code == 0
    assert os.listdir(os.path.join(out_dir, "figures")) == ["syn_000006.png"]  # the first of val
    code, _ = run_cli(tiny_run, "--figures", "syn_000008", "--pixel", "10", "20", out="figs")
    assert code == 0
    # Rows: image | truth | prediction; CAM | AFA per present class; affinity | attention; then
    # the legend of the class colours (lines of 14 px) and the heat maps' colour bar.
    # Tiles are enlarged to 256 px (captions need the room), each under a 14 px caption.
    dataset = evaluate.load_split(tiny_run["cfg"], "val", None)
    present = int(dataset[dataset.names.index("syn_000008")]["cls_labels"].sum())
    tile, caption, pad = 256, 14, 4
    grid = pad + (present + 2) * (tile + caption + pad)
    bar = visualize.colour_bar(2 * tile + pad).shape[0]
    with Image.open(os.path.join(out_dir, "figures", "syn_000008.png")) as figure:
        figure.load()
        assert figure.format == "PNG"
        assert figure.size[0] == pad + 3 * (tile + pad)
        legend_height = figure.size[1] - grid - bar - 2 * pad
        assert legend_height > 0 and legend_height % caption == 0


def test_legend_shows_each_class_colour_and_ignore():
    names = data.SYNTHETIC_CLASSES
    strip = visualize.legend([0, 2, 5, 255], names, width=400)
    colours = {tuple(c) for c in strip.reshape(-1, 3).tolist()}
    palette = visualize.palette()
    assert {tuple(palette[k].tolist()) for k in (0, 2, 5)} <= colours
    assert tuple(palette[1].tolist()) not in colours            # only the classes asked for
    assert tuple(palette[255].tolist()) == (255, 255, 255)      # ignore is drawn white
    narrow = visualize.legend(range(6), names, width=120)       # wraps onto more lines
    assert narrow.shape[1] == 120 and narrow.shape[0] > strip.shape[0]


def test_colour_bar_spans_the_fixed_scale():
    bar = visualize.colour_bar(400)
    row = bar[1 + visualize.COLOUR_BAR[1] // 2]                 # through the middle of the ramp
    low, high = (tuple(visualize.heat_map(torch.tensor([[v]]))[0, 0].tolist()) for v in (0.0, 1.0))
    found = [tuple(p) for p in row.tolist()]
    assert low in found and high in found and found.index(low) < found.index(high)


@torch.no_grad()
def test_heat_maps_are_on_one_fixed_scale(tiny_run, monkeypatch, tmp_path):
    """No panel is stretched to its own range: every heat map gets the values as they are
    (CAMs, walked scores, affinity and attention all lie in [0, 1] and keep their size)."""
    seen = []
    real = visualize.heat_map

    def spy(values):
        seen.append(values.detach().clone())
        return real(values)

    monkeypatch.setattr(visualize, "heat_map", spy)
    sample = evaluate.load_split(tiny_run["cfg"], "val", None)[0]
    visualize.attention_figure(tiny_run["model"], sample["image"], str(tmp_path / "f.png"),
                               data.SYNTHETIC_CLASSES, cls_labels=sample["cls_labels"],
                               truth=sample["label"], pixel=(10, 20),
                               settings=LabelSettings(cam_scales=(1.0, 1.5)))
    panels = [v for v in seen if v.shape[0] != visualize.COLOUR_BAR[1]]  # not the bar's ramp
    assert len(panels) == 2 * int(sample["cls_labels"].sum()) + 2
    for values in panels:
        assert 0 <= float(values.min()) and float(values.max()) < 1   # none rescaled to max 1
    assert float(panels[-1].max()) < 0.5                            # attention: a distribution


@pytest.mark.parametrize("flags,message", [
    (["--split", "nosuch"], "split list"),
    (["--backbone", "mit_b1"], "backbone=mit_b0"),
    (["--num-classes", "21"], "num_classes=6"),
    (["--figures", "syn_999999"], "no such image"),
    (["--figures", "syn_000006", "--pixel", "500", "1"], "outside"),
    (["--image", "/nonexistent/photo.jpg"], "does not exist"),
    (["--scales", "1.0", "-0.5"], "positive"),
    (["--image", "{thin}", "--long-side", "0"], "minimum input side"),
    (["--data", "COCO"], "--data COCO: this checkpoint of train.py was trained with data=synthetic"),
])
def test_cli_user_errors_are_one_line(tiny_run, capsys, flags, message):
    thin = tiny_run["root"] / "thin.png"
    Image.new("RGB", (200, 20)).save(thin)
    code, _ = run_cli(tiny_run, *(f.format(thin=thin) for f in flags), out="errors")
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, message)


def test_cli_missing_or_foreign_checkpoint(tiny_run, capsys):
    missing = str(tiny_run["root"] / "none.pth")
    assert evaluate.main(["--checkpoint", missing]) == 2
    err = capsys.readouterr().err
    assert missing in err and "--checkpoint" in err
    assert "--resume" not in err                          # a flag of train.py, not of this script
    foreign = str(tiny_run["root"] / "foreign.pth")
    torch.save({"state_dict": {}}, foreign)
    assert evaluate.main(["--checkpoint", foreign]) == 2
    assert "not written by train.py" in capsys.readouterr().err
    with pytest.raises(config.ConfigError):
        evaluate.main(["--checkpoint", missing, "--debug"])


# --- a trained network of the authors' release ------------------------------------------------------
def release_file(tiny_run, prefix="module."):
    """tiny_run's network saved as the release saves its own: the DDP wrapper's state dict."""
    path = tiny_run["root"] / f"wetr_release{prefix.rstrip('.')}.pth"
    torch.save(afanet_to_release(tiny_run["model"].state_dict(), prefix), path)
    return str(path)


@pytest.mark.parametrize("flag", [[], ["--no-speed-paths"]])
def test_the_speed_switch_follows_the_checkpoint_or_the_flag(tiny_run, flag):
    """evaluate.py runs the implementation the run trained with (the speed paths, by default)
    unless --no-speed-paths asks for the plain forms; the same seg logits up to float rounding."""
    path = tiny_run["checkpoint"]
    model, cfg, settings = evaluate.load_model(path, evaluate.parse_args(["--checkpoint", path, *flag]), "cpu")
    assert cfg.speed_paths is not bool(flag)
    assert settings.paths == (pipeline.Paths() if flag else pipeline.choose_paths(model, True))
    assert ("forward" in model.decoder.__dict__) is not bool(flag)
    images = torch.stack([sample["image"] for sample in evaluate.load_split(cfg, "val", None)])
    torch.testing.assert_close(multi_scale_seg_logits(model, images, long_side=0),
                               multi_scale_seg_logits(tiny_run["model"], images, long_side=0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_release_checkpoint_predicts_as_the_original(tiny_run, prefix, capsys):
    """The same network in the release's layout, with or without "module.", loads into the same
    weights and gives the same predictions; the configuration comes from the flags' preset."""
    path = release_file(tiny_run, prefix)
    flags = ["--data", "synthetic", "--data-root", tiny_run["data_root"]]
    model, cfg, _ = evaluate.load_model(path, evaluate.parse_args(["--checkpoint", path, *flags]), "cpu")
    assert "assumed the synthetic preset: backbone mit_b0, num_classes 6" in capsys.readouterr().out
    assert (cfg.data, cfg.backbone, cfg.num_classes) == ("synthetic", "mit_b0", NUM_CLASSES)
    original = tiny_run["model"].state_dict()
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(value, original[key]) for key, value in model.state_dict().items())
    images = torch.stack([sample["image"] for sample in evaluate.load_split(cfg, "val", None)])
    assert torch.equal(multi_scale_seg_logits(model, images, long_side=0),
                       multi_scale_seg_logits(tiny_run["model"], images, long_side=0))


def test_release_checkpoint_on_the_command_line(tiny_run, capsys):
    """The segmentation table and --image from a release file equal those of train.py's file."""
    release = release_file(tiny_run)
    data_flags = ["--data", "synthetic", "--data-root", tiny_run["data_root"]]
    photo = tiny_run["root"] / "release_photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(photo)
    results = {}
    for name, checkpoint, extra in (("ours", tiny_run["checkpoint"], []), ("release", release, data_flags)):
        out_dir = str(tiny_run["root"] / f"{name}_cli")
        common = ["--checkpoint", checkpoint, "--out", out_dir, "--workers", "0", "--device", "cpu",
                  "--long-side", "0", *extra]
        assert evaluate.main(common) == 0
        assert evaluate.main([*common, "--image", str(photo)]) == 0
        with open(os.path.join(out_dir, "metrics.json")) as f:
            miou = json.load(f)["mIoU"]
        with Image.open(os.path.join(out_dir, "predictions", "release_photo.png")) as mask:
            results[name] = (miou, np.asarray(mask).copy())
    assert "the authors' release" in capsys.readouterr().out
    assert results["release"][0] == results["ours"][0]
    assert np.array_equal(results["release"][1], results["ours"][1])


def test_release_checkpoint_of_another_backbone_names_the_flags(tiny_run, capsys):
    """VOC2012's preset (mit_b1, 21 classes) is assumed by default; a mit_b0 file with 6 classes
    says which flags fit it, in one line."""
    code = evaluate.main(["--checkpoint", release_file(tiny_run), "--out", str(tiny_run["root"] / "errors"),
                          "--device", "cpu"])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, "pass --backbone mit_b0 --num-classes 6")


def test_checkpoint_of_unknown_layout_names_the_known_ones(tiny_run, capsys):
    path = str(tiny_run["root"] / "unknown.pth")
    torch.save({"backbone.conv1.weight": torch.zeros(2, 3, 1, 1)}, path)
    assert evaluate.main(["--checkpoint", path, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, "not written by train.py")
    assert "the authors' release" in err and "attn_proj" in err


@pytest.mark.parametrize("name", ["broken.jpg", "README.md"])
def test_cli_unreadable_image(name, tiny_run, capsys):
    """One line that says the file is no image, not a data set's advice (its archive)."""
    broken = tiny_run["root"] / name
    broken.write_bytes(b"not a jpeg")
    code, _ = run_cli(tiny_run, "--image", str(broken), out="errors")
    assert code == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, f"--image {broken} cannot be read as an image")
    assert "archive" not in err and "split list" not in err


def test_cli_crf_without_the_package_is_one_clear_line(tiny_run, capsys, monkeypatch):
    hide_densecrf(monkeypatch)
    code, _ = run_cli(tiny_run, "--crf", out="crf_missing")
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, "pip install pydensecrf2")


@pytest.mark.skipif(not HAS_CRF, reason="pydensecrf2 is not installed")
def test_cli_crf_in_worker_processes(tiny_run):
    masks, out_dir = str(tiny_run["root"] / "crf_masks"), str(tiny_run["root"] / "crf")
    code = evaluate.main(["--checkpoint", tiny_run["checkpoint"], "--out", out_dir, "--crf",
                          "--long-side", "0", "--crf-workers", "2", "--save-masks", masks])
    assert code == 0
    with open(os.path.join(out_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["crf"] is True and 0 <= metrics["mIoU"] <= 1
    # Each mask is its own image's CRF result: the workers kept the order.
    dataset = evaluate.load_split(tiny_run["cfg"], "val", None)
    sample = dataset[2]
    logits = multi_scale_seg_logits(tiny_run["model"], sample["image"][None], long_side=0)[0]
    expected = evaluate.crf_label(evaluate.image_to_rgb(sample["image"]),
                                  logits.softmax(0).numpy())
    with Image.open(os.path.join(masks, sample["name"] + ".png")) as mask:
        assert np.array_equal(np.asarray(mask), expected)


def test_checkpoint_written_by_train_py(tmp_path):
    """Two iterations of train.py, then the pseudo-label table from its checkpoint."""
    data_root = str(tmp_path / "synthetic")
    synthetic.make_synthetic(data_root, num_train=4, num_val=2, size=SIZE)
    work_dir = str(tmp_path / "run")
    assert train.main(["--data-root", data_root, "--work-dir", work_dir, "--iters", "2",
                       "--batch-size", "2", "--crop", "64", "--workers", "0", "--eval-every", "2",
                       "--warmup-iters", "1", "--cam-iters", "0", "--switch-iters", "1",
                       "--num-figures", "0", "--device", "cpu"]) == 0
    checkpoint = os.path.join(work_dir, "checkpoints", "iter_2.pth")
    out_dir = str(tmp_path / "eval")
    assert evaluate.main(["--checkpoint", checkpoint, "--pseudo", "--out", out_dir,
                          "--workers", "0"]) == 0
    with open(os.path.join(out_dir, "metrics.json")) as f:
        assert 0 <= json.load(f)["afa_miou"] <= 1


def test_abbreviated_flags_are_refused(capsys):
    """--scale is not --scales: argparse's prefix matching is off."""
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--checkpoint", "x.pth", "--scale", "1.0"])
    assert e.value.code == 2 and "--scale" in capsys.readouterr().err


def test_pixel_help_and_error_say_y_then_x(tiny_run, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    assert "(y, x): row, then column" in " ".join(capsys.readouterr().out.split())
    code, _ = run_cli(tiny_run, "--figures", "syn_000006", "--pixel", "70", "1", out="errors")
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, "--pixel 70 1: (y, x) lies outside the 64×64")
