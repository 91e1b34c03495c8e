"""The training figure names the val image of every row."""
import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import synthetic
from model import AFANet
from par import PAR
from pipeline import LabelSettings
from visualize import CAPTION, PAD, save_panels, training_figure


def dark_pixels(path, box):
    """Pixels darker than mid-grey in box (left, top, right, bottom) of a PNG."""
    with Image.open(path) as image:
        return int((np.asarray(image.convert("L").crop(box)) < 128).sum())


def test_row_labels_are_drawn_left_of_each_row(tmp_path):
    tile = np.full((40, 40, 3), 255, dtype=np.uint8)                  # white tiles: only text is dark
    rows = [[("", tile), ("", tile)], [("", tile), ("", tile)]]
    save_panels(rows, str(tmp_path / "plain.png"))
    save_panels(rows, str(tmp_path / "named.png"), row_labels=["syn_000800", "syn_000801"])
    with Image.open(tmp_path / "plain.png") as plain, Image.open(tmp_path / "named.png") as named:
        extra = named.width - plain.width
        assert extra > 0 and named.height == plain.height
    row_height = (named.height - PAD) // 2
    for r in range(2):                                                # each row has its own label
        box = (0, r * row_height, extra, (r + 1) * row_height)
        assert dark_pixels(tmp_path / "named.png", box) > 20


def test_training_figure_returns_and_draws_the_image_names(tmp_path):
    root = str(tmp_path / "synthetic")
    synthetic.make_synthetic(root, num_train=2, num_val=2, size=64)
    val = data.build_dataset("synthetic", root, "val", train=False, num_classes=6)
    torch.manual_seed(0)
    model = AFANet(6, backbone="mit_b0").eval()
    path = str(tmp_path / "figure.png")
    names = training_figure(model, PAR(num_iter=2), val, [0, 1], path, torch.device("cpu"),
                            data.SYNTHETIC_CLASSES, LabelSettings(cam_scales=(1.0,)))
    assert names == [val[0]["name"], val[1]["name"]] and names[0] != names[1]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(measure.textlength(n)) for n in names)
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    for r in range(2):                     # left of each row's tiles: its name, black on white
        top = PAD + r * (64 + CAPTION + PAD) + CAPTION
        strip = rgb[top:top + 64, :label_w + PAD]
        assert (strip.max(-1) == strip.min(-1)).all()                # no image pixel
        assert (strip[..., 0] < 128).sum() > 20                       # the text
