"""The family of worlds: a world seed draws a world's structure, a sample seed draws pairs inside it.

A world's *structure* (:class:`WorldSpec`, a pure function of the world seed)
decides which attributes exist and their vocabularies -- shapes (from 12),
colours (from 14), 2 or 3 sizes, 1 to 3 fill styles (solid, hollow, striped,
dotted), plain or named backgrounds (dark, light, noisy or gradient), where a
lone object can be (nowhere in particular, 3 places in a row, 5 places, a 3x3
grid) and which scenes occur (a lone object; two objects left/right or
above/below; 2-4 copies of one object, counted) --, how objects are drawn
(outline width, colour and size jitter) and the caption grammar (how many
synonyms per word, the order of the adjectives, phrase forms such as "a red
circle" or "a circle that is red and small", prefixes, relation phrasings,
where the position goes). The *sample seed* and the split then draw images and
captions inside that world. Everything is deterministic: the same (world seed,
sample seed, split, n) gives the same pixels and captions on every machine.

Each world defines its zero-shot tasks from its own structure: coarse ones
(shape, colour, and size, fill, position, count, background where the world
has them) and fine-grained ones (colour+shape, the full description, and which
shape is left of / above which in two-object scenes), all on the split's test
or validation images; the linear probe's target is colour+shape of object A.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .base import SPLITS, WorldSplit, ZeroShotTask
from .builtin import _polygon as _builtin_polygon

FAMILY_VERSION = 1  # bump whenever drawing or captions change: invalidates cached checkpoints
IMAGE_SIZE = 32
_SUPER = 4

SHAPE_POOL = {
    "circle": ["circle", "disk", "round shape"], "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge", "pyramid"], "diamond": ["diamond", "rhombus", "lozenge"],
    "cross": ["cross", "plus sign", "plus"], "star": ["star", "five-pointed star", "star shape"],
    "hexagon": ["hexagon", "six-sided shape", "hex"], "pentagon": ["pentagon", "five-sided shape", "pentagon"],
    "arrow": ["arrow", "pointer", "arrow shape"], "bar": ["bar", "stripe", "strip"],
    "oval": ["oval", "ellipse", "egg shape"], "trapezoid": ["trapezoid", "trapezium", "tapered block"],
}
COLOUR_POOL = {  # name: (rgb, synonyms)
    "red": ((220, 40, 40), ["red", "scarlet", "crimson"]), "green": ((40, 180, 60), ["green", "emerald", "grass green"]),
    "blue": ((50, 90, 230), ["blue", "cobalt", "azure"]), "yellow": ((235, 220, 50), ["yellow", "lemon", "golden"]),
    "purple": ((150, 60, 200), ["purple", "violet", "lilac"]), "orange": ((245, 140, 30), ["orange", "amber", "tangerine"]),
    "white": ((240, 240, 240), ["white", "snow-white", "ivory"]), "cyan": ((60, 220, 225), ["cyan", "turquoise", "aqua"]),
    "pink": ((250, 130, 190), ["pink", "rose", "salmon"]), "brown": ((140, 85, 40), ["brown", "chocolate", "tan"]),
    "grey": ((128, 128, 128), ["grey", "gray", "ash"]), "lime": ((170, 240, 40), ["lime", "chartreuse", "lime green"]),
    "navy": ((25, 35, 120), ["navy", "dark blue", "midnight blue"]), "black": ((20, 20, 20), ["black", "jet", "coal"]),
}
_DARK_COLOURS = ("navy", "black", "brown", "purple")      # unreadable on a dark background
_LIGHT_COLOURS = ("white", "yellow", "lime", "cyan")      # unreadable on a light background
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["medium", "mid-sized", "medium-sized"],
              "large": ["large", "big", "huge"]}
_RADII = {2: {"small": 4.5, "large": 7.0}, 3: {"small": 3.5, "medium": 5.3, "large": 7.4}}
FILL_WORDS = {"solid": ["solid", "filled", "plain"], "hollow": ["hollow", "outlined", "empty"],
              "striped": ["striped", "stripy", "banded"], "dotted": ["dotted", "spotted", "speckled"]}
BACKGROUNDS = {  # kind: named backgrounds (rgb, words)
    "dark": {"black": ((15, 15, 20), ["black"]), "charcoal": ((50, 50, 55), ["charcoal", "dark grey"]),
             "midnight": ((20, 30, 60), ["midnight", "dark blue"]), "plum": ((50, 25, 40), ["plum", "dark purple"])},
    "light": {"cream": ((235, 225, 200), ["cream", "beige"]), "silver": ((200, 200, 205), ["silver", "light grey"]),
              "sky": ((190, 215, 240), ["sky", "pale blue"]), "mint": ((200, 235, 210), ["mint", "pale green"])},
}
POSITION_SCHEMES = {
    "none": {},
    "row3": {"left": ((9, 16), ["on the left", "at the left", "to the left side"]),
             "middle": ((16, 16), ["in the middle", "in the center", "at the center"]),
             "right": ((23, 16), ["on the right", "at the right", "to the right side"])},
    "corners5": {"center": ((16, 16), ["in the center", "in the middle", "at the center"]),
                 "top left": ((9, 9), ["in the top left corner", "at the upper left", "in the top left"]),
                 "top right": ((23, 9), ["in the top right corner", "at the upper right", "in the top right"]),
                 "bottom left": ((9, 23), ["in the bottom left corner", "at the lower left", "in the bottom left"]),
                 "bottom right": ((23, 23), ["in the bottom right corner", "at the lower right", "in the bottom right"])},
    "grid9": {f"{r} {c}".replace("middle middle", "middle"): ((x, y), [f"at the {r} {c}".replace("middle middle", "middle"),
                                                                     f"in the {r} {c}".replace("middle middle", "middle")])
              for r, y in (("top", 8), ("middle", 16), ("bottom", 24)) for c, x in (("left", 8), ("middle", 16), ("right", 24))},
}
RELATION_WORDS = {
    "horizontal": ["{a} to the left of {b}", "{b} to the right of {a}", "{a} on the left and {b} on the right",
                   "{a} beside {b}, {a_} first", "left: {a}; right: {b}"],
    "vertical": ["{a} above {b}", "{b} below {a}", "{a} on top and {b} underneath", "{b} under {a}",
                 "top: {a}; bottom: {b}"],
}
PREFIX_POOL = ["", "a photo of ", "an image of ", "there is ", "a picture showing ", "a drawing of ", "look: ",
               "a rendering of ", "we see "]
NUMBER_WORDS = {2: ["two", "a pair of", "2"], 3: ["three", "3", "three"], 4: ["four", "4", "four"]}
PHRASE_FORMS = ["adj", "that_is", "with", "postfix"]  # how attributes attach to the noun
SCENES = ("single", "pair", "copies")


@dataclass(frozen=True)
class WorldSpec:
    """A world's structure; :func:`make_spec` draws one from a world seed."""

    name: str
    seed: int
    shapes: Tuple[str, ...]
    colours: Tuple[str, ...]
    n_sizes: int
    fills: Tuple[str, ...]
    background: str              # dark | light | noisy | gradient
    named_backgrounds: bool      # backgrounds named in captions (and a zero-shot task)
    positions: str               # a POSITION_SCHEMES key
    scenes: Tuple[Tuple[str, float], ...]  # (scene, probability)
    relations: Tuple[str, ...]
    max_copies: int
    n_synonyms: int              # synonyms used per word (1: one word per attribute value)
    adjective_orders: Tuple[Tuple[str, ...], ...]
    phrase_forms: Tuple[str, ...]
    prefixes: Tuple[str, ...]
    relation_forms: Tuple[int, ...]  # indices into RELATION_WORDS[relation]
    position_first: float        # probability that the position phrase opens the caption
    outline: float               # outline width in pixels
    colour_jitter: int
    radius_jitter: float

    @property
    def sizes(self) -> List[str]:
        return list(_RADII[self.n_sizes])

    @property
    def position_names(self) -> List[str]:
        return list(POSITION_SCHEMES[self.positions])

    @property
    def background_names(self) -> List[str]:
        return list(BACKGROUNDS["light" if self.background == "light" else "dark"])

    def describe(self) -> dict:
        return asdict(self)


def make_spec(seed: int, name: Optional[str] = None) -> WorldSpec:
    """Draw a world's structure from ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, 31337])

    def pick(pool: Sequence, lo: int, hi: int) -> Tuple:
        k = int(rng.integers(lo, hi + 1))
        return tuple(pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False)))

    background = ["dark", "light", "noisy", "gradient"][int(rng.integers(4))]
    banned = _LIGHT_COLOURS if background == "light" else _DARK_COLOURS
    shapes = pick(list(SHAPE_POOL), 4, 8)
    colours = pick([c for c in COLOUR_POOL if c not in banned], 4, 9)
    n_sizes = int(rng.integers(2, 4))
    fills = pick(list(FILL_WORDS), 1, 3)
    positions = ["none", "row3", "corners5", "grid9"][int(rng.integers(4))]
    layout = int(rng.integers(3))  # which multi-object scenes the world has
    single = float(rng.uniform(0.35, 0.55))
    if layout == 0:
        scenes = (("single", single), ("pair", 1 - single))
    elif layout == 1:
        scenes = (("single", single), ("copies", 1 - single))
    else:
        scenes = (("single", single), ("pair", (1 - single) / 2), ("copies", (1 - single) / 2))
    relations = pick(["horizontal", "vertical"], 1, 2)
    attrs = ["size", "fill", "colour"]
    orders = tuple(tuple(attrs[i] for i in rng.permutation(3)) for _ in range(int(rng.integers(1, 3))))
    return WorldSpec(
        name=name or f"world{seed}", seed=seed, shapes=shapes, colours=colours, n_sizes=n_sizes, fills=fills,
        background=background, named_backgrounds=bool(rng.random() < 0.4), positions=positions, scenes=scenes,
        relations=relations, max_copies=int(rng.integers(3, 5)), n_synonyms=int(rng.integers(1, 4)),
        adjective_orders=orders, phrase_forms=pick(PHRASE_FORMS, 1, 3), prefixes=("",) + pick(PREFIX_POOL[1:], 1, 4),
        relation_forms=tuple(int(i) for i in sorted(rng.choice(5, size=int(rng.integers(1, 4)), replace=False))),
        position_first=float(rng.choice([0.0, 0.5, 1.0])), outline=float(rng.uniform(1.0, 2.0)),
        colour_jitter=int(rng.integers(6, 24)), radius_jitter=float(rng.uniform(0.2, 0.8)),
    )


# ---------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------

def _shape_outline(shape: str, cx: float, cy: float, r: float) -> List[tuple]:
    if shape in ("square", "triangle", "diamond", "cross", "star"):
        return _builtin_polygon(shape, cx, cy, r)
    if shape in ("hexagon", "pentagon"):
        k = 6 if shape == "hexagon" else 5
        return [(cx + r * np.cos(-np.pi / 2 + 2 * np.pi * i / k), cy + r * np.sin(-np.pi / 2 + 2 * np.pi * i / k))
                for i in range(k)]
    if shape == "arrow":
        t = r * 0.3
        return [(cx - r, cy - t), (cx + 0.1 * r, cy - t), (cx + 0.1 * r, cy - r * 0.75), (cx + r, cy),
                (cx + 0.1 * r, cy + r * 0.75), (cx + 0.1 * r, cy + t), (cx - r, cy + t)]
    if shape == "bar":
        return [(cx - r, cy - r * 0.35), (cx + r, cy - r * 0.35), (cx + r, cy + r * 0.35), (cx - r, cy + r * 0.35)]
    if shape == "trapezoid":
        return [(cx - r * 0.5, cy - r * 0.7), (cx + r * 0.5, cy - r * 0.7), (cx + r, cy + r * 0.7),
                (cx - r, cy + r * 0.7)]
    raise ValueError(shape)


_PATTERNS: Dict[str, np.ndarray] = {}


def _pattern(fill: str) -> np.ndarray:
    """A [big, big] 0/1 mask of the fill's texture (stripes or dots), at the supersampled resolution."""
    if fill not in _PATTERNS:
        big = IMAGE_SIZE * _SUPER
        yy, xx = np.mgrid[0:big, 0:big]
        if fill == "striped":
            _PATTERNS[fill] = ((yy // (2 * _SUPER)) % 2 == 0).astype(np.float32)
        else:  # dotted
            _PATTERNS[fill] = (((yy // _SUPER) % 3 == 1) & ((xx // _SUPER) % 3 == 1)).astype(np.float32)
            _PATTERNS[fill] = np.maximum(_PATTERNS[fill], np.roll(_PATTERNS[fill], 1, axis=(0, 1)))
    return _PATTERNS[fill]


def _draw_object(img: Image.Image, spec: WorldSpec, obj: tuple, cx: float, cy: float, rng) -> None:
    shape, colour, size, fill = obj
    r = (_RADII[spec.n_sizes][size] + rng.uniform(-spec.radius_jitter, spec.radius_jitter)) * _SUPER
    cx, cy = cx * _SUPER, cy * _SUPER
    j = spec.colour_jitter
    rgb = tuple(int(np.clip(v + rng.integers(-j, j + 1), 0, 255)) for v in COLOUR_POOL[colour][0])
    big = IMAGE_SIZE * _SUPER
    width = max(1, int(spec.outline * _SUPER))
    inside, edge = Image.new("L", (big, big), 0), Image.new("L", (big, big), 0)
    di, de = ImageDraw.Draw(inside), ImageDraw.Draw(edge)
    if shape in ("circle", "oval"):
        rx, ry = (r, r) if shape == "circle" else (r * 0.65, r)
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        di.ellipse(box, fill=255)
        de.ellipse(box, outline=255, width=width)
    else:
        pts = _shape_outline(shape, cx, cy, r)
        di.polygon(pts, fill=255)
        de.polygon(pts, outline=255, width=width)
    m = np.asarray(edge, dtype=np.float32)
    if fill == "solid":
        m = np.maximum(m, np.asarray(inside, dtype=np.float32))
    elif fill in ("striped", "dotted"):
        m = np.maximum(m, np.asarray(inside, dtype=np.float32) * _pattern(fill))
    img.paste(rgb, mask=Image.fromarray(m.astype(np.uint8)))


def _background(spec: WorldSpec, rng) -> Tuple[Image.Image, int]:
    big = IMAGE_SIZE * _SUPER
    names = spec.background_names
    b = int(rng.integers(len(names)))
    kind = "light" if spec.background == "light" else "dark"
    base = np.array(BACKGROUNDS[kind][names[b]][0], dtype=np.float32) + rng.integers(-8, 9, 3)
    if spec.background == "noisy":
        small = base + rng.normal(0, 12, (IMAGE_SIZE, IMAGE_SIZE, 3))
        arr = np.repeat(np.repeat(small, _SUPER, 0), _SUPER, 1)
    elif spec.background == "gradient":
        ramp = np.linspace(-25, 25, big, dtype=np.float32)
        arr = base + (ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None])
        arr = np.broadcast_to(arr, (big, big, 3))
    else:
        return Image.new("RGB", (big, big), tuple(int(v) for v in np.clip(base, 0, 255))), b
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), b


# ---------------------------------------------------------------------------
# captions
# ---------------------------------------------------------------------------

def _w(rng, spec: WorldSpec, words: Sequence[str]) -> str:
    return words[int(rng.integers(min(spec.n_synonyms, len(words))))]


def _adjectives(spec: WorldSpec, obj: tuple, order: Sequence[str], pick) -> List[str]:
    shape, colour, size, fill = obj
    words = {"size": pick(SIZE_WORDS[size]), "colour": pick(COLOUR_POOL[colour][1]),
             "fill": pick(FILL_WORDS[fill]) if len(spec.fills) > 1 else None}
    return [words[a] for a in order if words[a] is not None]


def _noun_phrase(spec: WorldSpec, obj: tuple, form: str, order: Sequence[str], pick, plural: str = "") -> str:
    """``obj`` described in ``form``; ``plural`` (a number word) makes it "three red circles"."""
    adjs = _adjectives(spec, obj, order, pick)
    noun = pick(SHAPE_POOL[obj[0]])
    if plural:
        noun = noun + ("es" if noun.endswith(("x", "s")) else "s")
        return f"{plural} {' '.join(adjs)} {noun}"
    art = "an" if (adjs[0] if form == "adj" else noun)[0] in "aeiou" else "a"
    if form == "adj":
        return f"{art} {' '.join(adjs)} {noun}"
    if form == "that_is":
        return f"{art} {noun} that is " + (", ".join(adjs[:-1]) + " and " + adjs[-1] if len(adjs) > 1 else adjs[0])
    if form == "with" and len(adjs) > 1:  # "a red circle, small and striped"
        art = "an" if adjs[-1][0] in "aeiou" else "a"
        return f"{art} {adjs[-1]} {noun}, " + " and ".join(adjs[:-1])
    if form == "with":
        return f"{art} {noun} in {adjs[0]}"
    return f"{art} {noun}, {' '.join(adjs)}"  # postfix


def _caption(rng, spec: WorldSpec, scene: str, objs: List[tuple], where: Optional[str], relation: Optional[str],
             count: int, bg_name: Optional[str]) -> str:
    def pick(words):
        return _w(rng, spec, words)

    order = spec.adjective_orders[int(rng.integers(len(spec.adjective_orders)))]
    form = spec.phrase_forms[int(rng.integers(len(spec.phrase_forms)))]
    prefix = spec.prefixes[int(rng.integers(len(spec.prefixes)))]
    if scene == "copies":
        text = _noun_phrase(spec, objs[0], form, order, pick, plural=pick(NUMBER_WORDS[count]))
    elif scene == "pair":
        a, b = (_noun_phrase(spec, o, form, order, pick) for o in objs)
        template = RELATION_WORDS[relation][spec.relation_forms[int(rng.integers(len(spec.relation_forms)))]]
        text = template.format(a=a, b=b, a_="the " + pick(SHAPE_POOL[objs[0][0]]))
    else:
        text = _noun_phrase(spec, objs[0], form, order, pick)
        if where is not None:
            place = pick(POSITION_SCHEMES[spec.positions][where][1])
            if rng.random() < spec.position_first:
                return (f"{place}, {text}" + (f", on a {bg_name} background" if bg_name else "")).strip()
            text = f"{text} {place}"
    if bg_name:
        text += f" on a {bg_name} background"
    return (prefix + text).strip()


# ---------------------------------------------------------------------------
# generation and tasks
# ---------------------------------------------------------------------------

ATTR_KEYS = ("n_objects", "scene", "shape_a", "colour_a", "size_a", "fill_a", "shape_b", "colour_b", "size_b",
             "fill_b", "position", "relation", "background")


def generate(spec: WorldSpec, n: int, seed: int = 0, split: str = "train") -> WorldSplit:
    """Draw ``n`` captioned images of ``split`` from world ``spec`` with sample seed ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([spec.seed, seed, SPLITS[split], 104729])
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions: List[str] = []
    attrs = {k: np.full(n, -1, dtype=np.int16) for k in ATTR_KEYS}
    scene_names = [s for s, _ in spec.scenes]
    scene_p = np.array([p for _, p in spec.scenes])
    sizes, positions = spec.sizes, spec.position_names
    bg_words = BACKGROUNDS["light" if spec.background == "light" else "dark"]

    def random_object():
        return (spec.shapes[int(rng.integers(len(spec.shapes)))], spec.colours[int(rng.integers(len(spec.colours)))],
                sizes[int(rng.integers(len(sizes)))], spec.fills[int(rng.integers(len(spec.fills)))])

    def record(key, obj):
        attrs[f"shape_{key}"][i] = spec.shapes.index(obj[0])
        attrs[f"colour_{key}"][i] = spec.colours.index(obj[1])
        attrs[f"size_{key}"][i] = sizes.index(obj[2])
        attrs[f"fill_{key}"][i] = spec.fills.index(obj[3])

    for i in range(n):
        img, b = _background(spec, rng)
        bg_name = None
        if spec.named_backgrounds:
            bg_name = _w(rng, spec, bg_words[spec.background_names[b]][1])
        attrs["background"][i] = b
        scene = scene_names[int(rng.choice(len(scene_names), p=scene_p / scene_p.sum()))]
        attrs["scene"][i] = SCENES.index(scene)
        obj = random_object()
        jit = rng.uniform(-1.5, 1.5, 8)
        where, relation, count, objs = None, None, 1, [obj]
        if scene == "single":
            if positions:
                where = positions[int(rng.integers(len(positions)))]
                x, y = POSITION_SCHEMES[spec.positions][where][0]
                attrs["position"][i] = positions.index(where)
            else:
                x, y = 16 + 2 * jit[2], 16 + 2 * jit[3]
            _draw_object(img, spec, obj, x + jit[0], y + jit[1], rng)
        elif scene == "pair":
            obj_b = random_object()
            objs = [obj, obj_b]
            relation = spec.relations[int(rng.integers(len(spec.relations)))]
            (xa, ya), (xb, yb) = ((8, 16), (24, 16)) if relation == "horizontal" else ((16, 8), (16, 24))
            _draw_object(img, spec, obj, xa + jit[0], ya + jit[1], rng)
            _draw_object(img, spec, obj_b, xb + jit[2], yb + jit[3], rng)
            attrs["relation"][i] = ["horizontal", "vertical"].index(relation)
            record("b", obj_b)
            count = 2
        else:  # copies of one object in distinct cells of a 2x2 grid, small so that they fit
            count = int(rng.integers(2, spec.max_copies + 1))
            obj = (obj[0], obj[1], sizes[0], obj[3])
            objs = [obj]
            for c in sorted(rng.choice(4, size=count, replace=False)):
                _draw_object(img, spec, obj, 9 + 14 * (c % 2) + jit[c], 9 + 14 * (c // 2) + jit[4 + c], rng)
        attrs["n_objects"][i] = count
        record("a", obj)
        captions.append(_caption(rng, spec, scene, objs, where, relation, count, bg_name))
        images[i] = np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))
    return WorldSplit(images=images, captions=captions, attrs=attrs)


_TEMPLATES = ["a {}.", "a photo of a {}.", "an image of a {}.", "there is a {}."]


def _describe(spec: WorldSpec, *, shape=None, colour=None, size=None, fill=None) -> str:
    """Class name in the world's canonical words (first synonyms) and its first adjective order."""
    words = {"size": SIZE_WORDS[size][0] if size else None, "colour": COLOUR_POOL[colour][1][0] if colour else None,
             "fill": FILL_WORDS[fill][0] if fill and len(spec.fills) > 1 else None}
    adjs = [words[a] for a in spec.adjective_orders[0] if words[a]]
    noun = SHAPE_POOL[shape][0] if shape else "object"
    return " ".join(adjs + [noun])


def zeroshot_tasks(spec: WorldSpec, split: WorldSplit) -> List[ZeroShotTask]:
    """The world's zero-shot tasks, coarse then fine-grained (see the module docstring)."""
    a = split.attrs
    single = np.flatnonzero(a["scene"] == SCENES.index("single"))
    sizes, nf = spec.sizes, len(spec.fills)

    def task(name, classes, idx, labels, fine):
        return ZeroShotTask(name, classes, _TEMPLATES, idx, np.asarray(labels, dtype=np.int64), fine)

    tasks = [task("shape", [SHAPE_POOL[s][0] for s in spec.shapes], single, a["shape_a"][single], False),
             task("colour", [_describe(spec, colour=c) for c in spec.colours], single, a["colour_a"][single], False),
             task("size", [_describe(spec, size=s) for s in sizes], single, a["size_a"][single], False)]
    if nf > 1:
        tasks.append(task("fill", [f"{FILL_WORDS[f][0]} object" for f in spec.fills], single, a["fill_a"][single],
                          False))
    if spec.positions != "none":
        tasks.append(task("position", [f"shape {POSITION_SCHEMES[spec.positions][p][1][0]}" for p in spec.position_names],
                          single, a["position"][single], False))
    if any(s == "copies" for s, _ in spec.scenes):
        copies = np.flatnonzero(a["scene"] == SCENES.index("copies"))
        counts = list(range(2, spec.max_copies + 1))
        tasks.append(task("count", [f"{NUMBER_WORDS[c][0]} {SHAPE_POOL[s][0]}s" for c in counts for s in spec.shapes],
                          copies, (a["n_objects"][copies] - 2) * len(spec.shapes) + a["shape_a"][copies], False))
    if spec.named_backgrounds:
        words = BACKGROUNDS["light" if spec.background == "light" else "dark"]
        tasks.append(task("background", [f"object on a {words[b][1][0]} background" for b in spec.background_names],
                          np.arange(len(split)), a["background"], False))
    tasks.append(task("colour_shape", [_describe(spec, colour=c, shape=s) for c in spec.colours for s in spec.shapes],
                      single, a["colour_a"][single] * len(spec.shapes) + a["shape_a"][single], True))
    full = [_describe(spec, size=z, fill=f, colour=c, shape=s) for z in sizes for f in spec.fills
            for c in spec.colours for s in spec.shapes]
    lab = ((a["size_a"] * nf + a["fill_a"]) * len(spec.colours) + a["colour_a"]) * len(spec.shapes) + a["shape_a"]
    tasks.append(task("full_description", full, single, lab[single], True))
    if any(s == "pair" for s, _ in spec.scenes):
        rel = spec.relations[0]
        idx = np.flatnonzero((a["scene"] == SCENES.index("pair")) & (a["relation"] == ["horizontal", "vertical"].index(rel)))
        word = "to the left of" if rel == "horizontal" else "above"
        classes = [f"{SHAPE_POOL[s][0]} {word} a {SHAPE_POOL[t][0]}" for s in spec.shapes for t in spec.shapes]
        tasks.append(task("left_right_shapes" if rel == "horizontal" else "above_below_shapes", classes, idx,
                          a["shape_a"][idx] * len(spec.shapes) + a["shape_b"][idx], True))
    return tasks


def probe_labels(spec: WorldSpec, split: WorldSplit) -> np.ndarray:
    """Linear-probe target: colour and shape of object A, on every image."""
    return (split.attrs["colour_a"] * len(spec.shapes) + split.attrs["shape_a"]).astype(np.int64)
