"""The built-in synthetic data set: a small procedurally generated set in VOC layout.

`make_synthetic` writes it where `data.py` reads it (`data.SYNTHETIC_LAYOUT`, class names
`data.SYNTHETIC_CLASSES`). It is designed to be learnable from scratch on a CPU in minutes (no
pretrained weights): each class has its own shape, texture and colour family, 1–3 objects cover
15–35% of the image; backgrounds, of three kinds and cluttered, are near-neutral around the
normalisation mean, so they carry no class signal. All images have the same size, so validation
batches may hold more than one. How the design was reached is in docs/demo_study.md.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from data import IGNORE_INDEX, IMAGENET_MEAN, voc_palette

SYNTHETIC_VERSION = 2  # bump whenever the generator's output changes: existing sets regenerate
SYNTHETIC_FOREGROUND_FRACTION = (0.15, 0.35)  # share of labelled object pixels per image
_SYNTHETIC_MARKER = "synthetic.json"
# Colours live around the normalisation mean (IMAGENET_MEAN): a colour is that mean, plus a
# luminance offset (equal in R, G, B), plus a chroma vector in the plane orthogonal to grey. The
# normalised image is then ≈ (luminance, chroma) / std. Backgrounds have small chroma in any
# direction; each class has a large chroma at its own angle, the five angles 72° apart, so every
# class colour lies equally far from every background. A neutral grey background would not do:
# normalisation turns grey into a blue-leaning colour, which a from-scratch "blue" feature cannot
# tell from a blue class (docs/demo_study.md, "Round 1").
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
