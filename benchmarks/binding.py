"""Does tinyflow's text encoder bind attributes to shapes?

FLUX gives text tokens no rotary position (``txt_ids`` are zeros), so the
transformer sees the encoder's token states as a set: which colour belongs to
which shape must be written into the states themselves. This probe measures
how much a shape token's state changes when only its colour changes, and how
much a colour token's state changes when only its shape changes, at the same
position in the prompt. Relative change ``||a - b|| / ||a||``; a few tenths of
a percent means the token does not carry its partner.

    python benchmarks/binding.py [--model DIR]
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch

from budcache import tinyflow
from budcache.tinyflow import grammar

#: (prompt a, prompt b, word, which occurrence): the word sits at the same position in both prompts.
PROBES = [
    ("circle token, single object, red vs blue", "a red circle", "a blue circle", "circle"),
    ("circle token, two objects, red vs blue", "a red circle and a blue square", "a blue circle and a red square",
     "circle"),
    ("square token, two objects, blue vs red", "a red circle and a blue square", "a blue circle and a red square",
     "square"),
    ("triangle token, two objects, green vs yellow", "a green triangle and a yellow circle",
     "a yellow triangle and a green circle", "triangle"),
    ("colour token, single object, circle vs square", "a red circle", "a red square", "red"),
    ("colour token, two objects, circle vs square", "a red circle and a blue square",
     "a red square and a blue circle", "red"),
]


def token_state(encoder: torch.nn.Module, prompt: str, word: str) -> torch.Tensor:
    """The encoder's output state of the first ``word`` of ``prompt`` (position 0 is ``<cls>``)."""
    words = prompt.split()
    tok, _ = encoder(torch.from_numpy(grammar.tokenize([prompt])))
    return tok[0, words.index(word) + 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="weights directory (default: the shipped weights)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    enc = tinyflow.load(a.model).text_encoder.eval()
    print(f"### Binding probe ({datetime.date.today()}, {platform.machine()}, torch {torch.__version__}; "
          f"weights: {a.model or 'shipped'})\n")
    print("Command: `python benchmarks/binding.py`\n")
    print("| token | prompt a | prompt b | relative change of the token state |")
    print("|---|---|---|---|")
    for name, pa, pb, word in PROBES:
        sa, sb = token_state(enc, pa, word), token_state(enc, pb, word)
        print(f"| {name} | {pa} | {pb} | {float((sa - sb).norm() / sa.norm()):.2%} |")


if __name__ == "__main__":
    main()
