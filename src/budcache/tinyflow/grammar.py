"""tinyflow's prompt grammar: scenes of coloured shapes with attributes left free.

A :class:`Scene` is what the renderer draws (every attribute of every object
set); a :class:`Spec` is what a prompt states (attributes the prompt leaves
free are ``None``). The generator draws a spec, writes its prompt, then draws
every free attribute at random, so the model must *choose* them when sampling.

Templates:
- one object, with any subset of size, colour and position stated
  ("a circle", "a large red square in the top left");
- two objects ("a red circle and a square"), drawn in reading order by default: the first-named
  object to the left of the second (``pair_layout="ordered"``; ``"free"`` places them anywhere);
- counts ("two green triangles", "three circles").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle"}
COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.2, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
COLOUR_NAMES = tuple(COLOURS)
#: Half the side of an object's bounding box, in pixels.
SIZES = {"small": 5.0, "large": 7.0}
SIZE_NAMES = tuple(SIZES)
#: 3x3 grid of image thirds: (row, column), row 0 at the top.
POSITIONS = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
POSITION_NAMES = tuple(POSITIONS)
COUNTS = {"two": 2, "three": 3}
MAX_OBJECTS = 3
#: Minimum gap in pixels between the bounding boxes of two objects.
GAP = 2.0
#: Margin in pixels that keeps a stated position away from a third's border.
POSITION_MARGIN = 1.0
#: How the two objects of a pair are laid out: "ordered" puts the first-named object to the left of the
#: second (their boxes at least GAP apart in x), "free" anywhere without overlap.
PAIR_LAYOUTS = ("ordered", "free")

VOCAB: tuple[str, ...] = (
    "<pad>", "<cls>", "a", "and", "in", "the",
    *SHAPES, *PLURALS, *COLOUR_NAMES, *SIZE_NAMES,
    "top", "bottom", "left", "right", "center", *COUNTS,
)
MAX_TOKENS = 12


@dataclass(frozen=True)
class ObjectSpec:
    """One object as a prompt states it; ``None`` means free."""

    shape: str
    colour: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Spec:
    """What a prompt states: the objects, and the template it came from."""

    template: str  # "single" | "pair" | "count" | "empty"
    objects: tuple[ObjectSpec, ...]

    @property
    def fully_specified(self) -> bool:
        """True for a single object whose size, colour and position are all stated."""
        return self.template == "single" and all(
            getattr(self.objects[0], f) is not None for f in ("colour", "size", "position")
        )


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: every attribute set; ``cx``/``cy`` centre in pixels."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float


def _article_phrase(o: ObjectSpec) -> str:
    words = ["a"]
    if o.size:
        words.append(o.size)
    if o.colour:
        words.append(o.colour)
    words.append(o.shape)
    if o.position:
        words += ["in", "the", o.position]
    return " ".join(words)


def prompt_of(spec: Spec) -> str:
    """Write the prompt of a spec in the grammar."""
    if spec.template == "empty":
        return ""
    if spec.template == "single":
        return _article_phrase(spec.objects[0])
    if spec.template == "pair":
        return " and ".join(_article_phrase(o) for o in spec.objects)
    if spec.template == "count":
        n = len(spec.objects)
        word = {v: k for k, v in COUNTS.items()}[n]
        o = spec.objects[0]
        return " ".join([word] + ([o.colour] if o.colour else []) + [o.shape + "s"])
    raise ConfigError(f"unknown template {spec.template!r}")


def parse_prompt(prompt: str) -> Spec:
    """Parse a prompt of the grammar back into a :class:`Spec` (the checker's input).

    Raises ConfigError naming the first word or construction the grammar lacks.
    """
    words = prompt.lower().replace(",", " ").split()
    if not words:
        return Spec("empty", ())
    for w in words:
        if w not in VOCAB or w.startswith("<"):
            raise ConfigError(f"prompt {prompt!r}: word {w!r} is not in tinyflow's vocabulary {sorted(VOCAB[2:])}")
    if words[0] in COUNTS:
        n = COUNTS[words[0]]
        rest = words[1:]
        colour = None
        if rest and rest[0] in COLOURS:
            colour = rest.pop(0)
        if len(rest) != 1 or rest[0] not in PLURALS:
            raise ConfigError(f"prompt {prompt!r}: a count must be followed by an optional colour and a plural shape")
        obj = ObjectSpec(PLURALS[rest[0]], colour)
        return Spec("count", (obj,) * n)
    phrases: list[list[str]] = [[]]
    for w in words:
        if w == "and":
            phrases.append([])
        else:
            phrases[-1].append(w)
    if len(phrases) > 2:
        raise ConfigError(f"prompt {prompt!r}: at most two objects joined by 'and'")
    objs = tuple(_parse_phrase(p, prompt) for p in phrases)
    return Spec("single" if len(objs) == 1 else "pair", objs)


def _parse_phrase(words: list[str], prompt: str) -> ObjectSpec:
    if not words or words[0] != "a":
        raise ConfigError(f"prompt {prompt!r}: each object phrase starts with 'a'")
    i, size, colour = 1, None, None
    if i < len(words) and words[i] in SIZES:
        size, i = words[i], i + 1
    if i < len(words) and words[i] in COLOURS:
        colour, i = words[i], i + 1
    if i >= len(words) or words[i] not in SHAPES:
        raise ConfigError(f"prompt {prompt!r}: expected a shape ({', '.join(SHAPES)}) in {' '.join(words)!r}")
    shape, i = words[i], i + 1
    position = None
    if i < len(words):
        tail = words[i:]
        if tail[:2] != ["in", "the"] or " ".join(tail[2:]) not in POSITIONS:
            raise ConfigError(
                f"prompt {prompt!r}: expected 'in the <position>' with position one of {list(POSITIONS)}"
            )
        position = " ".join(tail[2:])
    return ObjectSpec(shape, colour, size, position)


# --------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class TemplateMix:
    """Probabilities of the templates and of stating each attribute."""

    empty: float = 0.10
    single: float = 0.45
    pair: float = 0.25
    count: float = 0.20
    p_size: float = 0.5
    p_colour: float = 0.5
    p_position: float = 0.5
    p_pair_colour: float = 0.6
    p_pair_size: float = 0.25
    p_count_colour: float = 0.5

    def probs(self) -> np.ndarray:
        p = np.array([self.empty, self.single, self.pair, self.count], dtype=np.float64)
        return p / p.sum()


def sample_spec(rng: np.random.Generator, mix: TemplateMix = TemplateMix()) -> Spec:
    """Draw a prompt spec from the template mix."""
    template = ("empty", "single", "pair", "count")[rng.choice(4, p=mix.probs())]
    if template == "empty":
        return Spec("empty", ())

    def maybe(p: float, names: tuple[str, ...]) -> str | None:
        return names[rng.integers(len(names))] if rng.random() < p else None

    shape = SHAPES[rng.integers(len(SHAPES))]
    if template == "single":
        return Spec("single", (ObjectSpec(
            shape, maybe(mix.p_colour, COLOUR_NAMES), maybe(mix.p_size, SIZE_NAMES),
            maybe(mix.p_position, POSITION_NAMES)),))
    if template == "pair":
        objs = tuple(
            ObjectSpec(SHAPES[rng.integers(len(SHAPES))], maybe(mix.p_pair_colour, COLOUR_NAMES),
                       maybe(mix.p_pair_size, SIZE_NAMES))
            for _ in range(2)
        )
        return Spec("pair", objs)
    n = 2 + int(rng.integers(2))
    obj = ObjectSpec(shape, maybe(mix.p_count_colour, COLOUR_NAMES))
    return Spec("count", (obj,) * n)


def _centre_range(position: str | None, half: float) -> tuple[tuple[float, float], tuple[float, float]]:
    lo, hi = half, IMAGE_SIZE - half
    if position is None:
        return (lo, hi), (lo, hi)
    row, col = POSITIONS[position]
    third = IMAGE_SIZE / 3

    def rng_of(k: int) -> tuple[float, float]:
        a = max(lo, k * third + POSITION_MARGIN)
        b = min(hi, (k + 1) * third - POSITION_MARGIN)
        return a, b

    return rng_of(col), rng_of(row)


def realise(spec: Spec, rng: np.random.Generator, max_tries: int = 200,
            pair_layout: str = "ordered") -> tuple[SceneObject, ...]:
    """Draw every free attribute at random; objects never overlap (gap >= GAP px).

    With ``pair_layout="ordered"`` a two-object scene whose prompt states no position (every pair the
    templates draw) reads left to right like its prompt: the first object's box ends at least GAP px
    left of where the second's starts, ``cx_1 + h_1 + GAP <= cx_2 - h_2``; the vertical positions stay
    free. A pair with a stated position is placed as with ``"free"``.
    """
    if pair_layout not in PAIR_LAYOUTS:
        raise ConfigError(f"pair_layout must be one of {PAIR_LAYOUTS} (got {pair_layout!r})")
    if spec.template == "empty":
        spec = sample_spec(rng, TemplateMix(empty=0.0))
    if spec.template == "pair" and pair_layout == "ordered" and all(o.position is None for o in spec.objects):
        return _realise_ordered_pair(spec, rng)
    for _ in range(max_tries):
        placed: list[SceneObject] = []
        for o in spec.objects:
            colour, size = _colour_and_size(o, rng)
            half = SIZES[size]
            (x0, x1), (y0, y1) = _centre_range(o.position, half)
            ok = False
            for _ in range(30):
                cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
                if all(_apart(cx, cy, half, p) for p in placed):
                    ok = True
                    break
            if not ok:
                break
            placed.append(SceneObject(o.shape, colour, size, float(cx), float(cy)))
        else:
            return tuple(placed)
    raise ConfigError(f"could not place the objects of {prompt_of(spec)!r} without overlap")


def _realise_ordered_pair(spec: Spec, rng: np.random.Generator) -> tuple[SceneObject, ...]:
    """Two objects side by side: ``cx_1`` uniform where the second still fits, then ``cx_2`` uniform right of it."""
    a, b = spec.objects
    (ca, sa), (cb, sb) = _colour_and_size(a, rng), _colour_and_size(b, rng)
    h1, h2 = SIZES[sa], SIZES[sb]
    cx1 = rng.uniform(h1, IMAGE_SIZE - h1 - GAP - 2 * h2)
    cx2 = rng.uniform(cx1 + h1 + GAP + h2, IMAGE_SIZE - h2)
    cy1, cy2 = rng.uniform(h1, IMAGE_SIZE - h1), rng.uniform(h2, IMAGE_SIZE - h2)
    return (SceneObject(a.shape, ca, sa, float(cx1), float(cy1)),
            SceneObject(b.shape, cb, sb, float(cx2), float(cy2)))


def _colour_and_size(o: ObjectSpec, rng: np.random.Generator) -> tuple[str, str]:
    """The object's colour and size: as stated, else drawn at random (colour first)."""
    colour = o.colour or COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    return colour, o.size or SIZE_NAMES[rng.integers(len(SIZE_NAMES))]


def _apart(cx: float, cy: float, half: float, other: SceneObject) -> bool:
    h2 = SIZES[other.size]
    return abs(cx - other.cx) >= half + h2 + GAP or abs(cy - other.cy) >= half + h2 + GAP


def tokenize(prompts: list[str]) -> np.ndarray:
    """Token ids (B, MAX_TOKENS): ``<cls>`` then the words, padded with ``<pad>`` (id 0)."""
    index = {w: i for i, w in enumerate(VOCAB)}
    out = np.zeros((len(prompts), MAX_TOKENS), dtype=np.int64)
    for b, p in enumerate(prompts):
        words = p.lower().replace(",", " ").split()
        if len(words) + 1 > MAX_TOKENS:
            raise ConfigError(f"prompt {p!r} has {len(words)} words; tinyflow takes at most {MAX_TOKENS - 1}")
        out[b, 0] = index["<cls>"]
        for i, w in enumerate(words):
            if w not in index or w.startswith("<"):
                raise ConfigError(f"prompt {p!r}: word {w!r} is not in tinyflow's vocabulary {sorted(VOCAB[2:])}")
            out[b, i + 1] = index[w]
    return out


def heldout_pairs(n: int, seed: int = 1_000_003, mix: TemplateMix | None = None) -> list[tuple[str, int]]:
    """``n`` (prompt, seed) evaluation pairs drawn with a seed disjoint from training's."""
    rng = np.random.default_rng(seed)
    mix = mix or TemplateMix(empty=0.0)
    return [(prompt_of(sample_spec(rng, mix)), int(rng.integers(2**31))) for _ in range(n)]


__all__ = [
    "IMAGE_SIZE", "SHAPES", "COLOURS", "SIZES", "POSITIONS", "VOCAB", "MAX_TOKENS",
    "PAIR_LAYOUTS", "ObjectSpec", "Spec", "SceneObject", "TemplateMix", "prompt_of", "parse_prompt",
    "sample_spec", "realise", "tokenize", "heldout_pairs",
]
