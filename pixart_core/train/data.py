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
VOCABULARY = sorted({"a", "an", "the", "of", "on", "at", "in", "to", "left", "right", "top", "bottom", "center",
                     "above", "below", "and", *COLOURS, *SHAPES, *SIZES})


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


def make_scenes(seed: int, count: int, pair_prob: float = 0.5) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, pair_prob) for _ in range(count)]


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
