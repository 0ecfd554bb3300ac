"""The built-in world (``builtin``): procedurally drawn, captioned 32x32 images.

The demo's default world and one member of the family (:mod:`.family` draws
the others). Its drawing and captions are frozen: the same call gives the same
pixels and captions as before the family existed (a test checks a hash).

Why this world: HELIP helps where a model confuses pairs that differ in a few
details. A first probe (docs/design.md, "The built-in world") used one object with four
attributes; with only 480 combinations, every hard pair differed from its target
in position alone and the hard batches taught little else. This world is
combinatorially large instead: one or two objects, each with shape, colour, size
and fill style, placed by a spatial relation ("left of", "above") or at one of
five positions, on a jittered background, with captions drawn from several
templates, word orders and synonyms. About 40% of images hold one object
(~1.9k distinct descriptions) and 60% hold two (~147k), so two captioned images
that look alike usually differ in one or two attributes, and in different ones
from pair to pair, as web data does.

Everything is a pure function of (seed, split, size): the same call gives the
same pixels and captions on every machine.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .base import SPLITS, WorldSplit, ZeroShotTask

WORLD_VERSION = 2  # bump whenever drawing or captions change: invalidates cached checkpoints
IMAGE_SIZE = 32
_SUPER = 4  # draw at 4x and downsample: anti-aliased edges, shapes readable at 32 px

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star"]
SHAPE_WORDS = {
    "circle": ["circle", "disk", "round shape"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "triangle", "wedge"],
    "diamond": ["diamond", "rhombus", "lozenge"],
    "cross": ["cross", "plus sign", "plus"],
    "star": ["star", "star shape", "five-pointed star"],
}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (60, 220, 225),
}
COLOUR_WORDS = {
    "red": ["red", "red", "scarlet"],
    "green": ["green", "green", "emerald"],
    "blue": ["blue", "blue", "cobalt"],
    "yellow": ["yellow", "yellow", "lemon"],
    "purple": ["purple", "violet", "purple"],
    "orange": ["orange", "orange", "amber"],
    "white": ["white", "white", "snow-white"],
    "cyan": ["cyan", "turquoise", "cyan"],
}
SIZES = ["small", "large"]
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
STYLES = ["solid", "hollow"]
STYLE_WORDS = {"solid": ["solid", "filled", "solid"], "hollow": ["hollow", "outlined", "empty"]}
POSITIONS = ["center", "top left", "top right", "bottom left", "bottom right"]
POSITION_WORDS = {
    "center": ["in the center", "in the middle", "at the center"],
    "top left": ["in the top left corner", "at the upper left", "in the top left"],
    "top right": ["in the top right corner", "at the upper right", "in the top right"],
    "bottom left": ["in the bottom left corner", "at the lower left", "in the bottom left"],
    "bottom right": ["in the bottom right corner", "at the lower right", "in the bottom right"],
}
_POSITION_XY = {"center": (16, 16), "top left": (9, 9), "top right": (23, 9),
                "bottom left": (9, 23), "bottom right": (23, 23)}
RELATIONS = ["horizontal", "vertical"]  # object A left of / above object B
_RADIUS = {"small": 4.5, "large": 7.0}
_BACKGROUNDS = [(15, 15, 20), (45, 45, 50), (20, 30, 55), (40, 25, 35)]
_PREFIXES = ["", "", "a photo of ", "an image of ", "there is ", "a picture showing "]


def _word(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _phrase(rng: np.random.Generator, shape: str, colour: str, size: str, style: str) -> str:
    s, c = _word(rng, SIZE_WORDS[size]), _word(rng, COLOUR_WORDS[colour])
    st, sh = _word(rng, STYLE_WORDS[style]), _word(rng, SHAPE_WORDS[shape])
    form = int(rng.integers(3))
    if form == 0:
        return f"a {s} {st} {c} {sh}"
    if form == 1:
        return f"a {s} {c} {st} {sh}"
    return f"a {c} {sh}, {s} and {st}"


def _caption_single(rng, obj, position: str) -> str:
    a = _phrase(rng, *obj)
    where = _word(rng, POSITION_WORDS[position])
    if rng.integers(2) == 0:
        return (_word(rng, _PREFIXES) + f"{a} {where}").strip()
    return f"{where}, {a}"  # no "a photo of" before "in the center, ..."


def _caption_pair(rng, obj_a, obj_b, relation: str) -> str:
    a, b = _phrase(rng, *obj_a), _phrase(rng, *obj_b)
    form = int(rng.integers(3))
    if relation == "horizontal":
        text = [f"{a} to the left of {b}", f"{b} to the right of {a}",
                f"{a} on the left and {b} on the right"][form]
    else:
        text = [f"{a} above {b}", f"{b} below {a}", f"{a} on top and {b} underneath"][form]
    return (_word(rng, _PREFIXES) + text).strip()


def _polygon(shape: str, cx: float, cy: float, r: float) -> List[tuple]:
    if shape == "square":
        d = r * 0.85
        return [(cx - d, cy - d), (cx + d, cy - d), (cx + d, cy + d), (cx - d, cy + d)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "cross":
        t = r * 0.35
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            ang = -np.pi / 2 + i * np.pi / 5
            pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
        return pts
    raise ValueError(shape)


def _draw(draw: ImageDraw.ImageDraw, shape, colour, size, style, cx, cy, rng) -> None:
    r = (_RADIUS[size] + rng.uniform(-0.4, 0.4)) * _SUPER
    cx, cy = cx * _SUPER, cy * _SUPER
    rgb = tuple(int(np.clip(v + rng.integers(-18, 19), 0, 255)) for v in COLOURS[colour])
    fill = rgb if style == "solid" else None
    width = int(1.6 * _SUPER)
    if shape == "circle":
        box = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(box, fill=fill, outline=rgb, width=width)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill, outline=rgb, width=width)


def _random_object(rng):
    return (SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))],
            SIZES[int(rng.integers(2))], STYLES[int(rng.integers(2))])


def generate(n: int, seed: int = 0, split: str = "train", single_fraction: float = 0.4) -> WorldSplit:
    """Draw ``n`` captioned images of ``split`` (train/val/test) from world ``seed``.

    Splits use independent random streams, so the test split never shares a
    draw with training (identical descriptions can still recur by chance, as
    they would in any real data set).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS[split], 7919])
    colours = list(COLOURS)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions: List[str] = []
    keys = ["n_objects", "shape_a", "colour_a", "size_a", "style_a",
            "shape_b", "colour_b", "size_b", "style_b", "position", "relation"]
    attrs = {k: np.full(n, -1, dtype=np.int16) for k in keys}
    big = IMAGE_SIZE * _SUPER
    for i in range(n):
        bg = np.array(_BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]) + rng.integers(-8, 9, 3)
        img = Image.new("RGB", (big, big), tuple(int(v) for v in np.clip(bg, 0, 255)))
        draw = ImageDraw.Draw(img)
        obj_a = _random_object(rng)
        jitter = rng.uniform(-1.5, 1.5, 4)
        if rng.random() < single_fraction:
            pos = POSITIONS[int(rng.integers(len(POSITIONS)))]
            x, y = _POSITION_XY[pos]
            _draw(draw, *obj_a, x + jitter[0], y + jitter[1], rng)
            captions.append(_caption_single(rng, obj_a, pos))
            attrs["n_objects"][i] = 1
            attrs["position"][i] = POSITIONS.index(pos)
        else:
            obj_b = _random_object(rng)
            rel = RELATIONS[int(rng.integers(2))]
            (xa, ya), (xb, yb) = ((8, 16), (24, 16)) if rel == "horizontal" else ((16, 8), (16, 24))
            _draw(draw, *obj_a, xa + jitter[0], ya + jitter[1], rng)
            _draw(draw, *obj_b, xb + jitter[2], yb + jitter[3], rng)
            captions.append(_caption_pair(rng, obj_a, obj_b, rel))
            attrs["n_objects"][i] = 2
            attrs["relation"][i] = RELATIONS.index(rel)
            attrs["shape_b"][i], attrs["colour_b"][i] = SHAPES.index(obj_b[0]), colours.index(obj_b[1])
            attrs["size_b"][i], attrs["style_b"][i] = SIZES.index(obj_b[2]), STYLES.index(obj_b[3])
        attrs["shape_a"][i], attrs["colour_a"][i] = SHAPES.index(obj_a[0]), colours.index(obj_a[1])
        attrs["size_a"][i], attrs["style_a"][i] = SIZES.index(obj_a[2]), STYLES.index(obj_a[3])
        images[i] = np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))
    return WorldSplit(images=images, captions=captions, attrs=attrs)


# ---------------------------------------------------------------------------
# Evaluation tasks over the world
# ---------------------------------------------------------------------------

_OBJ_TEMPLATES = ["a {}.", "a photo of a {}.", "an image of a {}.", "there is a {}."]


def zeroshot_tasks(split: WorldSplit) -> List[ZeroShotTask]:
    """The zero-shot tasks: three coarse, three fine-grained.

    Coarse: shape, colour, position of a lone object. Fine-grained, where
    neighbouring classes differ in one attribute: colour+shape (48 classes),
    the full description size+style+colour+shape (192), and for two objects side
    by side, which shape is on the left and which on the right (36 classes, a
    class and its mirror differ only in order).
    """
    a = split.attrs
    single = np.flatnonzero(a["n_objects"] == 1)
    pair_h = np.flatnonzero((a["n_objects"] == 2) & (a["relation"] == 0))
    colours = list(COLOURS)
    tasks = [
        ZeroShotTask("shape", SHAPES, _OBJ_TEMPLATES, single, a["shape_a"][single].astype(np.int64), False),
        ZeroShotTask("colour", [f"{c} object" for c in colours], _OBJ_TEMPLATES, single,
                     a["colour_a"][single].astype(np.int64), False),
        ZeroShotTask("position", [f"shape {POSITION_WORDS[p][0]}" for p in POSITIONS], _OBJ_TEMPLATES,
                     single, a["position"][single].astype(np.int64), False),
    ]
    cs = [f"{c} {s}" for c in colours for s in SHAPES]
    tasks.append(ZeroShotTask("colour_shape", cs, _OBJ_TEMPLATES, single,
                              (a["colour_a"][single] * len(SHAPES) + a["shape_a"][single]).astype(np.int64), True))
    full = [f"{sz} {st} {c} {s}" for sz in SIZES for st in STYLES for c in colours for s in SHAPES]
    lab = ((a["size_a"] * len(STYLES) + a["style_a"]) * len(colours) + a["colour_a"]) * len(SHAPES) + a["shape_a"]
    tasks.append(ZeroShotTask("full_description", full, _OBJ_TEMPLATES, single, lab[single].astype(np.int64), True))
    lr = [f"{s} to the left of a {t}" for s in SHAPES for t in SHAPES]
    tasks.append(ZeroShotTask("left_right_shapes", lr, _OBJ_TEMPLATES, pair_h,
                              (a["shape_a"][pair_h] * len(SHAPES) + a["shape_b"][pair_h]).astype(np.int64), True))
    return tasks


def probe_labels(split: WorldSplit) -> np.ndarray:
    """Linear-probe target: colour and shape of object A (48 classes), on every image."""
    return (split.attrs["colour_a"] * len(SHAPES) + split.attrs["shape_a"]).astype(np.int64)
