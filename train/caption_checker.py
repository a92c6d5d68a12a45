"""Automatic checker: does a generated 64x64 nano image show what its caption says (colour, position, shape)?

How it looks at an image:
- every pixel is given the nearest palette colour (or the background) in RGB, if it is close enough to it;
- an object of colour c is the largest 4-connected region of pixels labelled c;
- its shape is the ideal circle / square / triangle (drawn by the dataset's own renderer, fitted to the region's
  bounding box) that overlaps the region best (IoU);
- single-object position: the nearest of the five canonical positions to the region's bounding-box centre;
  two-object relation: the dominant axis and sign of the difference of the two centres.

A caption is parsed with the dataset's grammar (data.py). Scores are fractions of prompts; "two_object_both" counts
two-object prompts where both objects have the right colour and shape and the relation holds. The checker is
validated on rendered ground truth (`validate_on_ground_truth`) before any model is scored with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from . import data
from .data import COLOURS, IMAGE_SIZE, POSITION_CENTRES, RELATIONS, SHAPES, SIZES, Scene, SceneObject

_PALETTE_NAMES = ["background", *COLOURS]
_PALETTE = np.array([data.BACKGROUND, *COLOURS.values()], dtype=np.float32) / 255.0
MAX_COLOUR_DISTANCE = 0.33  # RGB distance (0..sqrt 3) beyond which a pixel belongs to no palette colour
MIN_AREA = 30  # pixels; the smallest object (small triangle) covers about 110

_OBJ = r"an? (?:(?P<size{n}>{sizes}) )?(?P<colour{n}>{colours}) (?P<shape{n}>{shapes})"


def _object_pattern(n: int) -> str:
    return _OBJ.format(n=n, sizes="|".join(SIZES), colours="|".join(COLOURS), shapes="|".join(SHAPES))


_REL = "(?P<relation>" + "|".join(RELATIONS) + ")"
_POS = "(?P<position>" + "|".join(POSITION_CENTRES) + ")"
# every phrasing of data.phrasings: x is the subject (object 1), y the other object (2)
_PAIRS = [re.compile("^" + f.format(x=_object_pattern(1), r=_REL, y=_object_pattern(2)) + "$") for f in data.PAIR_FORMS]
_SINGLES = ([re.compile("^" + f.format(x=_object_pattern(1), p=_POS) + "$") for f in data.SINGLE_FORMS]
            + [re.compile("^" + f.format(x=_object_pattern(1)) + "$") for f in data.SINGLE_FORMS_NO_PLACE])


def parse_caption(caption: str) -> Scene:
    """The scene a caption asks for, in any of data.phrasings' forms (object positions are not filled in); objects[0]
    is the caption's subject."""
    text = " ".join(caption.lower().strip().split())
    for pattern in _PAIRS:
        m = pattern.match(text)
        if m:
            objs = [SceneObject(m[f"shape{i}"], m[f"colour{i}"], 0, 0, 0, m[f"size{i}"]) for i in (1, 2)]
            return Scene(objs, relation=m["relation"], caption=text)
    for pattern in _SINGLES:
        m = pattern.match(text)
        if m:
            position = m.groupdict().get("position")
            return Scene([SceneObject(m["shape1"], m["colour1"], 0, 0, 0, m["size1"])], position=position,
                         caption=text)
    raise ValueError(f"not a nano caption: {caption!r}")


# --------------------------------------------------------------------------------------------------- image analysis
def label_pixels(image: np.ndarray) -> np.ndarray:
    """(64, 64, 3) in [0, 1] -> (64, 64) int: 0 background, 1.. palette colour index, -1 no colour."""
    d = np.linalg.norm(image[:, :, None, :] - _PALETTE[None, None], axis=-1)
    lab = d.argmin(-1)
    lab[d.min(-1) > MAX_COLOUR_DISTANCE] = -1
    return lab


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (a small flood fill; no scipy needed)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for sy, sx in zip(*np.nonzero(mask)):
        if seen[sy, sx]:
            continue
        stack, region = [(sy, sx)], []
        seen[sy, sx] = True
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


@dataclass
class FoundObject:
    colour: str
    area: int
    cx: float = float("nan")
    cy: float = float("nan")
    shape: str | None = None
    shape_iou: dict = field(default_factory=dict)
    mask: np.ndarray | None = None


def _ideal_masks(mask: np.ndarray) -> dict[str, np.ndarray]:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    sizes = {"circle": (w + h) / 2, "square": (w + h) / 2 / 0.9, "triangle": (w + h / 0.9) / 2}
    return {s: data.object_mask(SceneObject(s, "red", cx, cy, sizes[s])) > 0.5 for s in SHAPES}


def classify_shape(mask: np.ndarray) -> tuple[str, dict]:
    ious = {}
    for s, ideal in _ideal_masks(mask).items():
        ious[s] = float((ideal & mask).sum() / max(1, (ideal | mask).sum()))
    return max(ious, key=ious.get), ious


def find_object(labels: np.ndarray, colour: str) -> FoundObject:
    idx = _PALETTE_NAMES.index(colour)
    comp = largest_component(labels == idx)
    area = int(comp.sum())
    found = FoundObject(colour, area, mask=comp)
    if area >= MIN_AREA:
        ys, xs = np.nonzero(comp)  # the bounding-box centre: a triangle's centroid sits low in its box
        found.cx, found.cy = (xs.min() + xs.max() + 1) / 2.0, (ys.min() + ys.max() + 1) / 2.0
        found.shape, found.shape_iou = classify_shape(comp)
    return found


def nearest_position(cx: float, cy: float) -> str:
    return min(POSITION_CENTRES, key=lambda p: (POSITION_CENTRES[p][0] * IMAGE_SIZE - cx) ** 2
               + (POSITION_CENTRES[p][1] * IMAGE_SIZE - cy) ** 2)


def relation_of(a: FoundObject, b: FoundObject) -> str:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


# --------------------------------------------------------------------------------------------------- checking
@dataclass
class CheckResult:
    caption: str
    colour: bool
    position: bool | None  # None: the caption names no position
    shape: bool
    pair: bool
    both: bool | None  # two-object prompts: everything right
    found: list[FoundObject]


def check(image: np.ndarray, caption: str) -> CheckResult:
    """image: (64, 64, 3) float in [0, 1]."""
    want = parse_caption(caption)
    labels = label_pixels(np.asarray(image, dtype=np.float32))
    found = [find_object(labels, o.colour) for o in want.objects]
    present = [f.area >= MIN_AREA for f in found]
    colour_ok = all(present)
    if len(want.objects) == 1 and colour_ok:  # the named colour must also be the main object in the picture
        areas = [int(largest_component(labels == i).sum()) for i in range(1, len(_PALETTE_NAMES))]
        colour_ok = max(areas) == found[0].area
    shape_ok = all(p and f.shape == o.shape for p, f, o in zip(present, found, want.objects))
    pair = len(want.objects) == 2
    if pair:
        position_ok = all(present) and relation_of(found[0], found[1]) == want.relation
    elif want.position is not None:
        position_ok = present[0] and nearest_position(found[0].cx, found[0].cy) == want.position
    else:
        position_ok = None
    both = (colour_ok and shape_ok and position_ok) if pair else None
    return CheckResult(caption, colour_ok, position_ok, shape_ok, pair, both, found)


def summarise(results: list[CheckResult]) -> dict:
    """Fractions of prompts: colour, position (prompts naming one), shape, two_object_both; and counts.
    position is also split into its two kinds (single_position: a one-object prompt's place; pair_relation: the
    two-object relation), because they fail for different reasons: placing one object vs binding colours to slots."""
    def rate(values):
        values = [v for v in values if v is not None]
        return (sum(values) / len(values)) if values else float("nan")

    return {
        "prompts": len(results),
        "colour": rate([r.colour for r in results]),
        "position": rate([r.position for r in results]),
        "single_position": rate([r.position for r in results if not r.pair]),
        "pair_relation": rate([r.position for r in results if r.pair]),
        "shape": rate([r.shape for r in results]),
        "two_object_prompts": sum(r.pair for r in results),
        "two_object_both": rate([r.both for r in results]),
    }


def score(images: np.ndarray, captions: list[str]) -> dict:
    """images: (B, 64, 64, 3) in [0, 1]."""
    return summarise([check(img, cap) for img, cap in zip(images, captions)])


def mask_iou(image: np.ndarray, obj: SceneObject) -> float:
    """IoU between the region of obj's colour in the image and obj's true silhouette (coverage > 0.5)."""
    found = find_object(label_pixels(np.asarray(image, dtype=np.float32)), obj.colour)
    truth = data.object_mask(obj) > 0.5
    return float((found.mask & truth).sum() / max(1, (found.mask | truth).sum()))


def evaluation_scenes(seed: int, count: int, varied: bool = False) -> list[Scene]:
    """Prompts for scoring: half single objects (all with a position), half two-object scenes. varied: the same
    scenes, each caption one of its phrasings (data.phrasings) instead of the original grammar."""
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(count):
        scenes.append(data.random_pair(rng) if i % 2 else data.random_single(rng, position_prob=1.0))
    if varied:
        vrng = np.random.default_rng([seed, 1])
        for s in scenes:
            data.vary_caption(s, vrng)
    return scenes


def validate_on_ground_truth(seed: int = 1234, count: int = 200, varied: bool = False) -> dict:
    """The checker's scores on the dataset's own renders (should all be 1.0)."""
    scenes = evaluation_scenes(seed, count, varied)
    return score(np.stack([data.render(s) for s in scenes]), [s.caption for s in scenes])
