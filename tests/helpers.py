"""Shared test helpers: a tiny random FLUX transformer and a counter of real block-stack runs."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel


def make_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """A tiny randomly initialised FLUX transformer (1 double + 2 single blocks, 16 channels)."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()


class StackRuns:
    """Counts real runs of the block stack: the first block's attention runs only when it computes.

    ``batches`` records the batch size of every run (a subset run is smaller than the batch).
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.batches: list[int] = []
        self._handle = transformer.transformer_blocks[0].attn.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.batches.append(hs.shape[0])

    @property
    def count(self) -> int:
        return len(self.batches)

    def __enter__(self) -> StackRuns:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
