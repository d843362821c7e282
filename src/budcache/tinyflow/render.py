"""Batched renderer of tinyflow scenes, on any torch device.

Each object is a hard-edged shape on a black background, given by its centre
``(cx, cy)`` and half-size ``h`` (pixels), evaluated at pixel centres:

- circle: ``(x-cx)^2 + (y-cy)^2 <= h^2``
- square: ``max(|x-cx|, |y-cy|) <= 0.9 h``
- triangle (apex up): ``|y-cy| <= h`` and ``|x-cx| <= h (y - cy + h) / (2h)``

Images are float tensors (B, 3, S, S) in [0, 1]; the model works in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .grammar import COLOUR_NAMES, COLOURS, IMAGE_SIZE, MAX_OBJECTS, SHAPES, SIZES, SceneObject

_PALETTE = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32)  # (C, 3)


def scene_params(scenes: Sequence[Sequence[SceneObject]]) -> torch.Tensor:
    """Pack scenes into a (B, MAX_OBJECTS, 6) tensor: present, shape, colour, half, cx, cy."""
    out = torch.zeros(len(scenes), MAX_OBJECTS, 6)
    for b, scene in enumerate(scenes):
        for i, o in enumerate(scene):
            out[b, i] = torch.tensor([1.0, SHAPES.index(o.shape), COLOUR_NAMES.index(o.colour),
                                      SIZES[o.size], o.cx, o.cy])
    return out


def render_params(params: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render packed scene parameters (B, M, 6) to images (B, 3, size, size) in [0, 1]."""
    device = params.device
    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    y = coords.view(1, 1, size, 1)
    x = coords.view(1, 1, 1, size)
    present, shape, colour, half, cx, cy = (params[..., i].reshape(*params.shape[:2], 1, 1) for i in range(6))
    dx, dy = x - cx, y - cy  # (B, M, S, S)
    circle = dx * dx + dy * dy <= half * half
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.9 * half
    triangle = (dy.abs() <= half) & (dx.abs() <= half * (dy + half) / (2 * half))
    masks = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle)) & (present > 0)
    rgb = _PALETTE.to(device)[colour.long().squeeze(-1).squeeze(-1)]  # (B, M, 3)
    img = (masks.unsqueeze(2).float() * rgb[..., None, None]).amax(dim=1)  # (B, 3, S, S)
    return img


def render(scenes: Sequence[Sequence[SceneObject]], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render scenes to images (B, 3, size, size) in [0, 1]."""
    return render_params(scene_params(scenes), size)
