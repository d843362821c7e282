"""Analytic checker: does an image show what its prompt states?

The image is split into objects by connected components of its bright pixels
(8-connected, components under ``MIN_AREA`` pixels are specks and ignored).
Each object gets:

- colour: the majority palette colour of its pixels (each pixel normalised by
  its brightest channel, then the nearest palette colour);
- shape: from the fill ratio ``area / bbox_area`` (square ~1, circle ~pi/4,
  triangle ~1/2), for the triangle the ratio of its top and bottom widths,
  and the diagonal extent ``q = (max(range(x+y), range(x-y)) + 1) / (h + w)``
  (square ~1: its corners reach the bounding box's diagonals; circle ~0.71):
  a generated square with ragged edges has a fill of only 0.8-0.9, like a
  circle, but keeps its corners;
- size: the longer bounding-box side against ``SIZE_SPLIT``;
- position: the third of the image (row, column) holding the bounding-box centre.

Only what the prompt states is judged; the number of objects always is.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np
import torch
from scipy import ndimage

from .grammar import COLOUR_NAMES, COLOURS, IMAGE_SIZE, POSITIONS, ObjectSpec, Spec, parse_prompt

MIN_AREA = 14
BRIGHT = 0.4
SIZE_SPLIT = 11.5
#: ``q`` (diagonal extent, see above) from which a component filled like a circle is read as a square: clean
#: renders give q <= 0.75 for circles and >= 0.94 for squares.
SQUARE_DIAGONAL = 0.85
#: The least fill of a ragged square (clean circles fill 0.75-0.87 of their box, triangles about 0.55).
RAGGED_SQUARE_FILL = 0.78
_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
_POS_OF_CELL = {v: k for k, v in POSITIONS.items()}


@dataclass(frozen=True)
class Found:
    """One object the checker found in an image."""

    shape: str
    colour: str
    size: str
    position: str
    area: int
    fill: float


@dataclass(frozen=True)
class Verdict:
    """Whether an image matches its prompt, and why not."""

    ok: bool
    reason: str
    found: tuple[Found, ...]


def _shape_of(comp: np.ndarray) -> tuple[str, float]:
    ys, xs = np.nonzero(comp)
    h = ys.max() - ys.min() + 1
    w = xs.max() - xs.min() + 1
    fill = float(comp.sum()) / float(h * w)
    rows = comp[ys.min():ys.max() + 1, xs.min():xs.max() + 1].sum(axis=1).astype(np.float64)
    k = max(1, h // 4)
    taper = rows[:k].mean() / max(rows[-k:].mean(), 1.0)
    if fill < 0.66 or (fill < 0.74 and taper < 0.5):
        return "triangle", fill
    if fill >= 0.9:
        return "square", fill
    diagonal = max(np.ptp(xs + ys), np.ptp(xs - ys)) + 1
    if fill >= RAGGED_SQUARE_FILL and diagonal / float(h + w) >= SQUARE_DIAGONAL:
        return "square", fill
    return "circle", fill


def find_objects(image: np.ndarray | torch.Tensor) -> tuple[Found, ...]:
    """Objects in one image (3, S, S) with values in [0, 1]."""
    img = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    img = np.clip(img, 0.0, 1.0)
    size = img.shape[-1]
    bright = img.max(axis=0)
    fg = bright >= BRIGHT
    norm = img / np.maximum(bright, 1e-6)[None]
    dist = ((norm.transpose(1, 2, 0)[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    colour_idx = dist.argmin(-1)
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    found = []
    third = size / 3
    for lab in range(1, n + 1):
        comp = labels == lab
        area = int(comp.sum())
        if area < MIN_AREA:
            continue
        ys, xs = np.nonzero(comp)
        shape, fill = _shape_of(comp)
        colour = COLOUR_NAMES[int(np.bincount(colour_idx[comp], minlength=len(COLOUR_NAMES)).argmax())]
        extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) * (IMAGE_SIZE / size)
        cy = (ys.min() + ys.max() + 1) / 2
        cx = (xs.min() + xs.max() + 1) / 2
        cell = (min(int(cy // third), 2), min(int(cx // third), 2))
        found.append(Found(shape, colour, "large" if extent >= SIZE_SPLIT else "small",
                           _POS_OF_CELL[cell], area, fill))
    return tuple(found)


def _matches(o: ObjectSpec, f: Found) -> bool:
    return (o.shape == f.shape and (o.colour is None or o.colour == f.colour)
            and (o.size is None or o.size == f.size) and (o.position is None or o.position == f.position))


def check_spec(spec: Spec, image: np.ndarray | torch.Tensor) -> Verdict:
    """Judge one image (3, S, S) in [0, 1] against a parsed prompt."""
    found = find_objects(image)
    if spec.template == "empty":
        return Verdict(True, "empty prompt: nothing to check", found)
    want = spec.objects
    if len(found) != len(want):
        return Verdict(False, f"expected {len(want)} object(s), found {len(found)}", found)
    for perm in permutations(found):
        if all(_matches(o, f) for o, f in zip(want, perm)):
            return Verdict(True, "match", found)
    return Verdict(False, "objects do not match the stated attributes", found)


def check(prompt: str, image: np.ndarray | torch.Tensor) -> Verdict:
    """Judge one image (3, S, S) in [0, 1] against its prompt."""
    return check_spec(parse_prompt(prompt), image)


def accuracy(prompts: list[str], images: torch.Tensor) -> float:
    """Fraction of images (B, 3, S, S) in [0, 1] that match their prompts."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
    return float(np.mean([check(p, im).ok for p, im in zip(prompts, images)])) if prompts else float("nan")
