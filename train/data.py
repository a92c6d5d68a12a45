"""Procedural captioned scenes for PixArt-nano: coloured shapes on a dark background, their captions and edge maps.

Everything is deterministic from a seed (numpy Generator). A scene has one or two objects:
- one object: "a big red circle on the left" (the position phrase is sometimes left out; the object is then anywhere);
- two objects: "a red circle above a small blue square" (above / below / to the left of / to the right of), always in
  two different colours, so a checker can tell them apart by colour.
Images are drawn 4x larger with PIL and box-filtered down (antialiased), 64x64 RGB. The edge map of a scene is the
white outline of every object on black, the kind of soft edge map the PixArt-δ HED ControlNet reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4
BACKGROUND = (22, 22, 26)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (45, 185, 70),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 50),
    "purple": (160, 65, 215),
    "cyan": (50, 205, 215),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 16.0, "big": 25.0}  # side of the bounding box in pixels at 64x64
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
RELATIONS = ("above", "below", "to the left of", "to the right of")
# centre of each single-object position, as fractions of the image (x, y)
POSITION_CENTRES = {
    "on the left": (0.27, 0.5), "on the right": (0.73, 0.5), "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73), "in the center": (0.5, 0.5),
}
INVERSE = {"above": "below", "below": "above", "to the left of": "to the right of",
           "to the right of": "to the left of"}
# words of the varied phrasings ("there is ...", "... is above ...") and of the canonical scene descriptions the text
# encoder is pre-trained to write ("anywhere": a single object whose caption names no place)
PHRASING_WORDS = ("there", "is", "anywhere")
VOCABULARY = sorted({"a", "an", "the", "of", "on", "at", "in", "to", "left", "right", "top", "bottom", "center",
                     "above", "below", "and", *PHRASING_WORDS, *COLOURS, *SHAPES, *SIZES})


@dataclass
class SceneObject:
    shape: str
    colour: str
    cx: float  # centre in pixels (64x64 image)
    cy: float
    size: float  # bounding-box side in pixels
    size_word: str | None = None  # the size named in the caption, if any


@dataclass
class Scene:
    objects: list[SceneObject]
    position: str | None = None  # single object: the position phrase of the caption (None = not said)
    relation: str | None = None  # two objects: objects[0] <relation> objects[1]
    caption: str = ""
    meta: dict = field(default_factory=dict)


def describe_object(o: SceneObject) -> str:
    words = ["a"] + ([o.size_word] if o.size_word else []) + [o.colour, o.shape]
    return " ".join(words)


def caption_of(scene: Scene) -> str:
    if len(scene.objects) == 1:
        text = describe_object(scene.objects[0])
        return text + (f" {scene.position}" if scene.position else "")
    a, b = scene.objects
    return f"{describe_object(a)} {scene.relation} {describe_object(b)}"


# Phrasings of one scene. A pair "A <rel> B" is said with either object as the subject (B <inverse rel> A) and in four
# forms, so neither the first colour of a caption nor the relation word alone says which object is where:
PAIR_FORMS = ("{x} {r} {y}", "{x} is {r} {y}", "there is {x} {r} {y}", "{r} {y} there is {x}")
SINGLE_FORMS = ("{x} {p}", "{x} is {p}", "there is {x} {p}", "{p} there is {x}")  # with a position phrase
SINGLE_FORMS_NO_PLACE = ("{x}", "there is {x}")


def phrasings(scene: Scene) -> list[str]:
    """Every caption of a scene in the varied phrasings; the first one is caption_of(scene) (the original grammar).
    Pairs: 8 (4 forms x either object as the subject), single objects: 4 (2 without a position phrase)."""
    if len(scene.objects) == 1:
        x = describe_object(scene.objects[0])
        if scene.position is None:
            return [f.format(x=x) for f in SINGLE_FORMS_NO_PLACE]
        return [f.format(x=x, p=scene.position) for f in SINGLE_FORMS]
    a, b = (describe_object(o) for o in scene.objects)
    out = []
    for form in PAIR_FORMS:
        out.append(form.format(x=a, r=scene.relation, y=b))
        out.append(form.format(x=b, r=INVERSE[scene.relation], y=a))
    return out


def place_of_pair(relation: str) -> tuple[str, str]:
    """Where objects[0] and objects[1] of a pair are: ("top", "bottom"), ("left", "right"), ..."""
    return {"above": ("top", "bottom"), "below": ("bottom", "top"), "to the left of": ("left", "right"),
            "to the right of": ("right", "left")}[relation]


def canonical_description(scene: Scene) -> str:
    """What a caption says, independent of its phrasing: the objects in a fixed spatial order (top to bottom, then
    left to right), each as "<place> [size] <colour> <shape>". "a blue square below a red circle" and "above a blue
    square there is a red circle" both give "top red circle bottom blue square". A single object without a position
    phrase has the place "anywhere"."""
    def one(o: SceneObject, place: str) -> str:
        return " ".join([place] + ([o.size_word] if o.size_word else []) + [o.colour, o.shape])

    if len(scene.objects) == 1:
        place = scene.position.split()[-1] if scene.position else "anywhere"
        return one(scene.objects[0], place)
    places = place_of_pair(scene.relation)
    order = {"top": 0, "left": 0, "bottom": 1, "right": 1}
    pairs = sorted(zip(scene.objects, places), key=lambda op: order[op[1]])
    return " ".join(one(o, p) for o, p in pairs)


def _size(rng: np.random.Generator, named: bool) -> tuple[float, str | None]:
    word = str(rng.choice(list(SIZES)))
    return SIZES[word] * float(rng.uniform(0.92, 1.08)), (word if named else None)


def random_single(rng: np.random.Generator, position_prob: float = 0.8, size_word_prob: float = 0.6,
                  free_placement: bool = False) -> Scene:
    """One object; with a position phrase (probability position_prob) it sits near that position, else anywhere."""
    size, word = _size(rng, rng.random() < size_word_prob)
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    half = size / 2 + 2
    if not free_placement and rng.random() < position_prob:
        position = str(rng.choice(POSITIONS))
        fx, fy = POSITION_CENTRES[position]
        cx = fx * IMAGE_SIZE + rng.uniform(-4, 4)
        cy = fy * IMAGE_SIZE + rng.uniform(-4, 4)
    else:
        position = None
        cx, cy = rng.uniform(half, IMAGE_SIZE - half), rng.uniform(half, IMAGE_SIZE - half)
    cx, cy = float(np.clip(cx, half, IMAGE_SIZE - half)), float(np.clip(cy, half, IMAGE_SIZE - half))
    scene = Scene([SceneObject(shape, colour, cx, cy, size, word)], position=position)
    scene.caption = caption_of(scene)
    return scene


def random_pair(rng: np.random.Generator, size_word_prob: float = 0.4) -> Scene:
    """Two objects of different colours in a relation; objects[0] is the subject of the caption."""
    relation = str(rng.choice(RELATIONS))
    c1, c2 = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    objs = []
    for colour in (c1, c2):
        size, word = _size(rng, rng.random() < size_word_prob)
        objs.append(SceneObject(str(rng.choice(SHAPES)), colour, 0.0, 0.0, size, word))
    # along the relation axis the two sit at about 0.27 and 0.73 of the image; across it they wander a little
    near, far = 0.27 * IMAGE_SIZE, 0.73 * IMAGE_SIZE
    first, second = (near, far) if relation in ("above", "to the left of") else (far, near)
    for o, along in zip(objs, (first, second)):
        across = IMAGE_SIZE / 2 + rng.uniform(-6, 6)
        along = along + rng.uniform(-3, 3)
        if relation in ("above", "below"):
            o.cx, o.cy = across, along
        else:
            o.cx, o.cy = along, across
        half = o.size / 2 + 1
        o.cx, o.cy = float(np.clip(o.cx, half, IMAGE_SIZE - half)), float(np.clip(o.cy, half, IMAGE_SIZE - half))
    scene = Scene(objs, relation=relation)
    scene.caption = caption_of(scene)
    return scene


def random_scene(rng: np.random.Generator, pair_prob: float = 0.5) -> Scene:
    return random_pair(rng) if rng.random() < pair_prob else random_single(rng)


def vary_caption(scene: Scene, rng: np.random.Generator) -> Scene:
    """Give the scene one of its phrasings (uniformly), in place; returns the scene."""
    options = phrasings(scene)
    scene.caption = options[int(rng.integers(len(options)))]
    return scene


def make_scenes(seed: int, count: int, pair_prob: float = 0.5, varied: bool = False) -> list[Scene]:
    """varied: each caption is one of the scene's phrasings (data.phrasings), else the original grammar."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, pair_prob) for _ in range(count)]
    if varied:
        vrng = np.random.default_rng([seed, 1])  # a separate stream: the scenes are the same either way
        for s in scenes:
            vary_caption(s, vrng)
    return scenes


# --------------------------------------------------------------------------------------------------- drawing
def _polygon(o: SceneObject, scale: float) -> list[tuple[float, float]] | None:
    cx, cy, s = o.cx * scale, o.cy * scale, o.size * scale
    if o.shape == "square":
        h = s * 0.45  # a square of side 0.9 s: about the area of the circle of diameter s... within 15 %
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if o.shape == "triangle":  # pointing up, width s, height 0.9 s, centred on its bounding box
        h = s * 0.45
        return [(cx, cy - h), (cx + s / 2, cy + h), (cx - s / 2, cy + h)]
    return None


def _draw(draw: ImageDraw.ImageDraw, o: SceneObject, scale: float, fill=None, outline=None, width: int = 0) -> None:
    poly = _polygon(o, scale)
    if poly is None:
        r = o.size * scale / 2
        box = (o.cx * scale - r, o.cy * scale - r, o.cx * scale + r, o.cy * scale + r)
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif outline is not None:
        draw.line(poly + [poly[0], poly[1]], fill=outline, width=width, joint="curve")
    else:
        draw.polygon(poly, fill=fill)


def _downsample(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.float32) / 255.0


def render(scene: Scene) -> np.ndarray:
    """(64, 64, 3) float32 in [0, 1]; later objects are drawn over earlier ones."""
    big = IMAGE_SIZE * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, SUPERSAMPLE, fill=COLOURS[o.colour])
    return _downsample(img)


def object_mask(o: SceneObject) -> np.ndarray:
    """(64, 64) float32 coverage of one object in [0, 1] (antialiased)."""
    big = IMAGE_SIZE * SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    _draw(ImageDraw.Draw(img), o, SUPERSAMPLE, fill=255)
    return _downsample(img)


def render_edges(scene: Scene, line_px: float = 1.5) -> np.ndarray:
    """(64, 64, 3) float32: white outlines of every object on black (a clean soft-edge map)."""
    big = IMAGE_SIZE * SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, SUPERSAMPLE, outline=255, width=max(1, int(round(line_px * SUPERSAMPLE))))
    edge = _downsample(img)
    return np.repeat(edge[..., None], 3, axis=2)


def to_signed_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """HWC [0, 1] arrays -> (B, 3, H, W) float32 in [-1, 1], the VAE's input range."""
    arr = np.stack(images).transpose(0, 3, 1, 2)
    return torch.from_numpy(arr).mul(2).sub(1).contiguous()


def batch(scenes: list[Scene], edges: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Images (or edge maps) of scenes as a (B, 3, 64, 64) tensor in [-1, 1], with their captions."""
    draw = render_edges if edges else render
    return to_signed_tensor([draw(s) for s in scenes]), [s.caption for s in scenes]
