"""Figures: label maps in the VOC colours, heat maps of CAMs, affinity and attention, predictions.

In the spirit of the paper's Fig. 1 and Fig. 5 (and §4.3): what the network's CAMs, its learned
affinity and its raw attention look like for one image and one query pixel, and how the labels of
the training step (CAM, PAR, AFA) compare with the ground truth. Every figure carries a legend of
the class colours (white = ignored, 255); every heat map uses one fixed scale, 0 (blue) … 1 (red),
drawn as a colour bar under the figure, so that panels and figures can be compared. Pixel
coordinates are written (y, x): row, then column, counted from the top-left corner.

`train.py` draws `training_figure` at every validation; `evaluate.py --figures` draws
`attention_figure` and `--save-masks` writes `save_prediction`'s files.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
from pipeline import LabelSettings, denormalize, make_pseudo_labels, token_grid, upsample

IGNORE_INDEX = data.IGNORE_INDEX
CLASS_NAMES = {"synthetic": data.SYNTHETIC_CLASSES, "voc2012": data.VOC_CLASSES,
               "voc": data.VOC_CLASSES, "coco": data.COCO_CLASSES, "coco2014": data.COCO_CLASSES}
CAPTION = 14          # pixels of text above each tile
PAD = 4               # white gap between tiles
SWATCH = 10           # side of a legend's colour square
COLOUR_BAR = (200, 10)  # width, height of the heat maps' colour bar


def class_names_of(dataset_name: str, num_classes: int) -> tuple:
    """Names of the C classes of a data set ("class k" when the count does not match)."""
    names = CLASS_NAMES.get(dataset_name.lower(), ())
    return names if len(names) == num_classes else tuple(f"class {k}" for k in range(num_classes))


# =============================================================================================
# Colours
# =============================================================================================
def palette() -> np.ndarray:
    """(256, 3) uint8: the VOC colours of the class ids; the ignore id 255 is white."""
    colours = np.array(data.voc_palette(256), dtype=np.uint8).reshape(-1, 3)
    colours[IGNORE_INDEX] = 255
    return colours


def colorize(label: torch.Tensor) -> np.ndarray:
    """Label map (H, W) → RGB uint8 array (H, W, 3) in the VOC colours; 255 is drawn white."""
    return palette()[label.cpu().numpy().astype(np.int64)]


def heat_map(values: torch.Tensor) -> np.ndarray:
    """(H, W) values on the fixed scale [0, 1] → RGB uint8 (H, W, 3), jet (blue 0 … red 1).
    Values outside [0, 1] are clipped: every heat map of every figure shares this scale."""
    v = values.float().clamp(0, 1).cpu().numpy()[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)    # r, g, b ramps
    return (rgb * 255).round().astype(np.uint8)


def image_to_rgb(image: torch.Tensor) -> np.ndarray:
    """Normalised image (3, H, W) → RGB uint8 array (H, W, 3)."""
    rgb = denormalize(image[None].float())[0].clamp(0, 1)                     # (3, H, W)
    return (rgb.permute(1, 2, 0) * 255).round().byte().cpu().numpy()


def blend(rgb: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (rgb * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def overlay(rgb: np.ndarray, label: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """The image with the predicted classes' colours blended in; background left as it is."""
    colours = blend(rgb, colorize(label), alpha)
    foreground = (label.cpu().numpy() != 0)[..., None]
    return np.where(foreground, colours, rgb)


def mark(rgb: np.ndarray, pixel: tuple, arm: int = 4) -> np.ndarray:
    """A white cross with a black outline at pixel (y, x)."""
    out = rgb.copy()
    y, x = pixel
    for colour, width in (((0, 0, 0), 1), ((255, 255, 255), 0)):
        out[max(y - width, 0):y + width + 1, max(x - arm, 0):x + arm + 1] = colour
        out[max(y - arm, 0):y + arm + 1, max(x - width, 0):x + width + 1] = colour
    return out


# =============================================================================================
# Legend and colour bar
# =============================================================================================
def legend(class_ids, class_names, width: int) -> np.ndarray:
    """RGB uint8 (h, width, 3): a swatch and the name of each class id, then "ignore" in white,
    wrapped onto as many lines as `width` needs."""
    entries = [(palette()[k], f"{k} {class_names[k]}")
               for k in sorted(set(class_ids)) if k != IGNORE_INDEX]
    entries.append((palette()[IGNORE_INDEX], f"{IGNORE_INDEX} ignore"))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height, lines, x = CAPTION, [[]], 0
    for colour, text in entries:
        item = SWATCH + 4 + int(measure.textlength(text)) + 12
        if lines[-1] and x + item > width:
            lines.append([])
            x = 0
        lines[-1].append((x, colour, text))
        x += item
    canvas = Image.new("RGB", (width, line_height * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        top = row * line_height + (line_height - SWATCH) // 2
        for x, colour, text in line:
            draw.rectangle([x, top, x + SWATCH - 1, top + SWATCH - 1],
                           fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
            draw.text((x + SWATCH + 4, row * line_height + 1), text, fill=(0, 0, 0))
    return np.asarray(canvas)


def colour_bar(width: int) -> np.ndarray:
    """RGB uint8 (h, width, 3): the heat maps' scale, 0 (blue) … 1 (red), with ticks 0, 0.5, 1."""
    title = "heat maps, one scale:"
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(measure.textlength(title)) + 8
    bar_width, bar_height = max(min(COLOUR_BAR[0], width - left - 8), 20), COLOUR_BAR[1]
    canvas = Image.new("RGB", (max(width, left + bar_width + 8), bar_height + CAPTION + 2),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((0, 0), title, fill=(0, 0, 0))
    ramp = torch.linspace(0, 1, bar_width)[None].expand(bar_height, bar_width)  # (h, w)
    canvas.paste(Image.fromarray(heat_map(ramp)), (left, 1))
    for value in (0.0, 0.5, 1.0):
        x = left + round(value * (bar_width - 1))
        draw.line([x, 1 + bar_height, x, 3 + bar_height], fill=(0, 0, 0))
        tick = f"{value:g}"
        draw.text((x - int(draw.textlength(tick)) // 2, 3 + bar_height), tick, fill=(0, 0, 0))
    return np.asarray(canvas)[:, :width]


# =============================================================================================
# Layout: tiles into one PNG
# =============================================================================================
def save_panels(rows: list, path: str, footer=(), row_labels=()) -> None:
    """Rows of (caption, RGB array) tiles into one PNG, each tile under its own caption; the
    `row_labels` (one text per row, e.g. the image's name) in a column on the left; the `footer`
    arrays (legend, colour bar) below, left-aligned."""
    tile_h = max(a.shape[0] for row in rows for _, a in row)
    tile_w = max(a.shape[1] for row in rows for _, a in row)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((int(measure.textlength(t)) + PAD for t in row_labels), default=0)
    width = label_w + max(len(row) for row in rows) * (tile_w + PAD) + PAD
    height = len(rows) * (tile_h + CAPTION + PAD) + PAD + sum(f.shape[0] + PAD for f in footer)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        top = PAD + r * (tile_h + CAPTION + PAD)
        if r < len(row_labels):
            draw.text((PAD, top + CAPTION + (tile_h - CAPTION) // 2), row_labels[r], fill=(0, 0, 0))
        for c, (title, a) in enumerate(row):
            left = label_w + PAD + c * (tile_w + PAD)
            draw.text((left + 1, top), title, fill=(0, 0, 0))
            canvas.paste(Image.fromarray(a), (left, top + CAPTION))
    top = PAD + len(rows) * (tile_h + CAPTION + PAD)
    for extra in footer:
        canvas.paste(Image.fromarray(extra[:, : width - PAD]), (PAD, top))
        top += extra.shape[0] + PAD
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def panels_width(rows: list) -> int:
    """Width of the tiles of `save_panels` from the first to the last column's right edge."""
    tile_w = max(a.shape[1] for row in rows for _, a in row)
    return max(len(row) for row in rows) * (tile_w + PAD) - PAD


def display_resizer(size: tuple, display_size: int):
    """Enlarge small images so that the long side is `display_size` (captions need the room)."""
    H, W = size
    factor = max(1.0, display_size / max(H, W))
    target = (round(W * factor), round(H * factor))

    def resize(rgb: np.ndarray, resample) -> np.ndarray:
        if factor == 1.0:
            return rgb
        return np.asarray(Image.fromarray(rgb).resize(target, resample))
    return resize


def save_prediction(pred: torch.Tensor, rgb: np.ndarray, folder: str, name: str) -> str:
    """`folder/<name>.png`: the mask as a palette PNG (pixel values = class ids, VOC colours);
    `folder/overlay/<name>.png`: the overlay. Returns the mask's path."""
    os.makedirs(os.path.join(folder, "overlay"), exist_ok=True)
    mask = Image.fromarray(pred.cpu().numpy().astype(np.uint8))
    mask.putpalette(data.voc_palette())                      # "L" → "P"; the values stay the ids
    path = os.path.join(folder, name + ".png")
    mask.save(path)
    Image.fromarray(overlay(rgb, pred)).save(os.path.join(folder, "overlay", name + ".png"))
    return path


# =============================================================================================
# The training figure: the labels of the step beside the ground truth
# =============================================================================================
@torch.no_grad()
def training_figure(model, par, dataset, indices, path: str, device, class_names,
                    settings: LabelSettings) -> list:
    """One row per image, named on the left: image | ground truth | CAM label | PAR label | AFA label | prediction |
    learned affinity and raw attention of one pixel (paper Fig. 3 and 4: the affinity of a pixel
    on an object should cover that object, the attention it is learned from need not), then a
    legend of the class colours and the heat maps' colour bar; the model in eval mode.

    The labels are the chain's (pipeline.make_pseudo_labels) for the whole image: the CAM label
    at the evaluation threshold, the PAR and AFA labels as in training. The pixel (marked +) is
    the centre of the largest ground-truth object. The affinity (a sigmoid, in [0, 1]) and the
    attention (averaged over the AFA head's maps) are those the random walk uses, at the
    largest CAM scale; the attention, a softmax over the tokens whose values are small where it
    spreads, is drawn divided by its maximum. Returns the rows' image names, top to bottom.
    """
    rows, shown, names = [], set(), []
    for i in indices:
        sample = dataset[i]
        names.append(str(sample.get("name", i)))
        image = sample["image"][None].to(device)                              # (1, 3, H, W)
        cls_labels = sample["cls_labels"][None].to(device)                    # (1, C-1)
        H, W = image.shape[-2:]
        box = torch.tensor([[0, H, 0, W]], device=device)                     # (1, 4)
        chain = make_pseudo_labels(model, par, {"image": image, "cls_labels": cls_labels,
                                                "valid_box": box},
                                   settings.for_evaluation(), need=("cam", "par", "afa"))
        affinity = chain.affinity                                             # (1, N, N)
        labels = [sample["label"].to(device), chain.cam[0], chain.par[0], chain.afa[0],
                  upsample(model(image).seg_logits, (H, W)).argmax(1)[0]]
        shown.update(int(k) for label in labels for k in label.unique())
        rgb = image_to_rgb(sample["image"])
        pixel = largest_object_centre(labels[0])
        attention, grid, query = attention_rows(model, image, max(settings.cam_scales), pixel)
        maps = [affinity[0, query], attention / attention.max().clamp_min(1e-12)]  # 2 × (N,)
        rows.append([rgb] + [colorize(x) for x in labels]
                    + [mark(blend(rgb, heat_map(token_row_map(m, grid, (H, W)))), pixel)
                       for m in maps])
    titles = ("image", "truth", "CAM", "CAM+PAR", "AFA+PAR", "seg", "affinity of +",
              "attention/max")                                        # captions of the first row
    rows = [[(title if r == 0 else "", tile) for title, tile in zip(titles, row)]
            for r, row in enumerate(rows)]
    width = panels_width(rows)
    save_panels(rows, path, footer=[legend(shown, class_names, width), colour_bar(width)],
                row_labels=names)
    return names


# =============================================================================================
# The attention figure: CAMs, AFA-propagated CAMs, affinity and attention of one pixel
# =============================================================================================
def connected_components(label: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """4-connected regions of one foreground class: (H, W) labels → (H, W) int64 ids, 0 elsewhere.

    Each pixel starts with its own id and repeatedly takes the largest id among its same-class
    neighbours until nothing changes (at most as many sweeps as the longest path in a region).
    """
    H, W = label.shape
    foreground = (label != 0) & (label != ignore_index)
    ids = torch.arange(1, H * W + 1, device=label.device).view(H, W) * foreground  # (H, W)
    padded_label = F.pad(label[None, None].float(), (1, 1, 1, 1), value=-1)[0, 0]  # (H+2, W+2)
    shifts = ((0, 1), (2, 1), (1, 0), (1, 2))                 # up, down, left, right
    same = [padded_label[dy:dy + H, dx:dx + W] == label for dy, dx in shifts]     # 4 × (H, W)
    while True:
        padded = F.pad(ids[None, None], (1, 1, 1, 1))[0, 0]                        # (H+2, W+2)
        grown = ids
        # Background and ignored pixels start at 0 and only see each other: they stay 0.
        for (dy, dx), keep in zip(shifts, same):
            grown = torch.maximum(grown, padded[dy:dy + H, dx:dx + W] * keep)
        if torch.equal(grown, ids):
            return ids
        ids = grown


def largest_object_centre(label: torch.Tensor) -> tuple:
    """(y, x) of the pixel of the largest predicted object nearest to the object's centroid
    (on the object even when it is a ring); the image centre when nothing is predicted."""
    H, W = label.shape
    ids = connected_components(label)
    if not bool((ids > 0).any()):
        return H // 2, W // 2
    counts = torch.bincount(ids.flatten())                    # (H·W + 1,)
    counts[0] = 0
    inside = ids == counts.argmax()
    ys, xs = inside.nonzero(as_tuple=True)
    cy, cx = ys.float().mean(), xs.float().mean()
    nearest = ((ys - cy) ** 2 + (xs - cx) ** 2).argmin()
    return int(ys[nearest]), int(xs[nearest])


def token_row_map(matrix_row: torch.Tensor, grid: tuple, size: tuple) -> torch.Tensor:
    """One row (N,) of an N × N token matrix as a map (H, W), values as they are."""
    h, w = grid
    values = matrix_row.float().view(1, 1, h, w)                              # (1, 1, h, w)
    return F.interpolate(values, size=size, mode="bilinear", align_corners=False)[0, 0]  # (H, W)


@torch.no_grad()
def attention_rows(model, x: torch.Tensor, scale: float, pixel: tuple) -> tuple:
    """The raw attention of one pixel: (row (N,), grid (h, w)) at `scale` for image x (1, 3, H, W).

    softmax(q·kᵀ/√d) of the heads of the blocks the AFA head reads, averaged over those maps;
    the pixel (y, x) is mapped to its token on the h × w grid of the resized image.
    """
    H, W = x.shape[-2:]
    scaled = x if scale == 1.0 else F.interpolate(
        x, size=(int(scale * H), int(scale * W)), mode="bilinear", align_corners=False)
    _, attn_logits = model.encoder(scaled)                                    # each (1, nh, N, N)
    head_dim = model.encoder.embed_dims[-1] // model.encoder.num_heads[-1]
    maps = torch.cat(attn_logits[-model.afa_blocks:], dim=1).float()                              # (1, maps, N, N)
    attention = maps.mul(head_dim ** -0.5).softmax(-1).mean(1)               # (1, N, N)
    grid = (token_grid(scaled.shape[-2]), token_grid(scaled.shape[-1]))
    y, x_ = pixel
    query = (y * grid[0] // H) * grid[1] + (x_ * grid[1] // W)               # the pixel's token
    return attention[0, query], grid, query


@torch.no_grad()
def attention_figure(model, image: torch.Tensor, path: str, class_names,
                     cls_labels: torch.Tensor | None = None, truth: torch.Tensor | None = None,
                     pixel: tuple | None = None, settings: LabelSettings = LabelSettings(),
                     display_size: int = 256) -> tuple:
    """One PNG for one image (3, H, W): image | truth | prediction; per present class its CAM and
    its AFA-propagated CAM; the learned affinity and the raw attention of one pixel; a legend of
    the class colours and the heat maps' colour bar. Returns the pixel (y, x) used.

    The classes are `cls_labels` (C-1,) — the image-level labels — or, when None, those the
    classifier predicts (logit > 0; the top one if none is). The affinity and the attention are
    those the random walk of the training step uses: at the largest CAM scale, the attention
    averaged over the AFA head's maps. `pixel` (y, x) defaults to the centre of the largest
    object of the seg prediction; one outside the image raises ValueError. Every heat map is on
    the scale [0, 1]: the CAMs, the walked class scores, the affinity (a sigmoid) and the
    attention (a softmax over the N tokens, so its values are small where it spreads).
    """
    device = next(model.parameters()).device
    x = image[None].to(device)                                                # (1, 3, H, W)
    H, W = x.shape[-2:]
    out = model(x)
    pred = upsample(out.seg_logits, (H, W)).argmax(1)[0]                      # (H, W)
    if cls_labels is None:
        cls_labels = (out.cls_logits[0] > 0).float()                          # (C-1,)
        if not bool(cls_labels.any()):
            cls_labels[out.cls_logits[0].argmax()] = 1
    cls_labels = cls_labels.to(device).float()[None]                          # (1, C-1)
    pixel = largest_object_centre(pred) if pixel is None else tuple(pixel)
    y, x_ = pixel
    if not (0 <= y < H and 0 <= x_ < W):
        raise ValueError(f"pixel (y, x) = ({y}, {x_}) lies outside the {H}×{W} image")

    chain = make_pseudo_labels(model, None, {"image": x, "cls_labels": cls_labels},
                               settings.for_evaluation(), need=("walk",))
    cams, walked, affinity = chain.cams, chain.walked, chain.affinity  # (1, C-1, H, W), (1, C, H, W), (1, N, N)
    attention, grid, query = attention_rows(model, x, max(settings.cam_scales), pixel)

    rgb = image_to_rgb(image)
    display = display_resizer((H, W), display_size)

    def heat(values):
        return display(blend(rgb, heat_map(values)), Image.BILINEAR)

    rows = [[("image", display(mark(rgb, pixel), Image.BILINEAR))]]
    if truth is not None:
        rows[0].append(("truth", display(colorize(truth), Image.NEAREST)))
    rows[0].append(("prediction", display(mark(blend(rgb, colorize(pred)), pixel), Image.NEAREST)))
    present = cls_labels[0].nonzero()[:, 0].tolist()
    rows += [[(f"CAM: {class_names[k + 1]}", heat(cams[0, k])),
              (f"AFA: {class_names[k + 1]}", heat(walked[0, k + 1]))] for k in present]
    where = f"(y, x) = ({y}, {x_})"
    rows.append([(f"{name} of {where}",
                  display(mark(blend(rgb, heat_map(token_row_map(row, grid, (H, W)))), pixel),
                          Image.BILINEAR))
                 for name, row in (("affinity", affinity[0, query]), ("attention", attention))])
    shown = set(int(k) for k in pred.unique()) | {k + 1 for k in present}
    if truth is not None:
        shown |= set(int(k) for k in truth.unique())
    width = panels_width(rows)
    save_panels(rows, path, footer=[legend(shown, class_names, width), colour_bar(width)])
    return pixel
