"""Shared test helpers: tiny random FLUX transformer, Wan and SD3 pipelines, and a counter of block-stack runs."""

from __future__ import annotations

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)


def make_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """A tiny randomly initialised FLUX transformer (1 double + 2 single blocks, 16 channels)."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()


def make_wan_pipeline(seed: int = 0) -> WanPipeline:
    """A WanPipeline around a tiny random transformer (3 blocks, text dim 16); no text encoder or VAE."""
    torch.manual_seed(seed)
    t = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                              out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=3, cross_attn_norm=True,
                              qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=t,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline around a tiny random transformer (3 blocks, text dim 16, pooled 8)."""
    torch.manual_seed(seed)
    t = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=8, out_channels=4).eval()
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None, transformer=t)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


def parent_pid(pid: int) -> int:
    """The parent pid of ``pid`` (Linux ``/proc/PID/stat``; the command name may hold spaces and parentheses)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
