"""Every transformer family whose blocks diffusers' block registry knows (plus budcache's own block table).

For each family a tiny random transformer is built here (no download) and
driven for N steps by a minimal loop whose scheduler is only host state (the
step index), as a pipeline's is. A uniform K-of-N policy applied with
``budcache.diffusers.apply`` must run every block of the stack exactly K
times, and a policy that computes every step must give outputs bit-equal to
the unhooked transformer's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import pytest
import torch
from diffusers.hooks._helpers import TransformerBlockRegistry

import budcache.diffusers as bd
from budcache import CachePolicy, ConfigError
from budcache.hooks import BLOCK_CONTRACTS, BlockContract, block_stack

torch.set_num_threads(1)

N, K = 6, 3


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


@dataclass(frozen=True)
class Family:
    """A transformer built tiny, and the inputs of one call at timestep ``t`` (in 0..1000)."""

    model: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Generator], Callable[[float], dict[str, Any]]]


def _dit():
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                        sample_size=8, patch_size=2, norm_num_groups=4)
    return m


def _dit_inputs(g: torch.Generator):
    x = _rand(g, 1, 4, 8, 8)
    return lambda t: dict(hidden_states=x, timestep=torch.tensor([int(t)]), class_labels=torch.tensor([1]))


def _flux_like_inputs(channels: int, text_dim: int, pooled: int | None = None, guidance: bool = False, ids: int = 3):
    def make(g: torch.Generator):
        x, e = _rand(g, 1, 16, channels), _rand(g, 1, 4, text_dim)
        p = _rand(g, 1, pooled) if pooled else None
        img_ids, txt_ids = torch.zeros(16, ids), torch.zeros(4, ids)
        img_ids[:, 1] = torch.arange(16) // 4
        img_ids[:, 2] = torch.arange(16) % 4

        def call(t: float) -> dict[str, Any]:
            kw = dict(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([t / 1000]), img_ids=img_ids,
                      txt_ids=txt_ids)
            if p is not None:
                kw["pooled_projections"] = p
            if guidance:
                kw["guidance"] = torch.tensor([3.5])
            return kw
        return call
    return make


def _flux():
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                            pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def _bria():
    return diffusers.BriaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                            axes_dims_rope=[4, 6, 6])


def _flux2():
    return diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4))


def _sd3():
    return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           caption_projection_dim=16, pooled_projection_dim=8, out_channels=4)


def _sd3_inputs(g: torch.Generator):
    x, e, p = _rand(g, 1, 4, 8, 8), _rand(g, 1, 6, 16), _rand(g, 1, 8)
    return lambda t: dict(hidden_states=x, encoder_hidden_states=e, pooled_projections=p, timestep=torch.tensor([t]))


def _wan():
    return diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                           in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                           num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                           rope_max_seq_len=32)


def _wan_inputs(g: torch.Generator):
    x, e = _rand(g, 1, 4, 1, 8, 8), _rand(g, 1, 8, 16)
    return lambda t: dict(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([t]))


def _cogvideox():
    return diffusers.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                 out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=2,
                                                 sample_width=8, sample_height=8, sample_frames=1, patch_size=2,
                                                 temporal_compression_ratio=4, max_text_seq_length=8)


def _cogvideox_inputs(g: torch.Generator):
    x, e = _rand(g, 1, 1, 4, 8, 8), _rand(g, 1, 8, 16)
    return lambda t: dict(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([int(t)]))


def _cogview4():
    return diffusers.CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                                attention_head_dim=4, num_attention_heads=4, text_embed_dim=8,
                                                time_embed_dim=8, condition_dim=4, sample_size=8, pos_embed_max_size=8,
                                                rope_axes_dim=(4, 4))


def _cogview4_inputs(g: torch.Generator):
    x, e = _rand(g, 1, 4, 8, 8), _rand(g, 1, 4, 8)
    size = torch.tensor([[64, 64]])
    return lambda t: dict(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([t]), original_size=size,
                          target_size=size, crop_coords=torch.tensor([[0, 0]]))


def _hunyuan_video(image_condition_type: str | None = None) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        return diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 2),
            image_condition_type=image_condition_type)
    return make


def _hunyuan_video_inputs(g: torch.Generator):
    x, e, p = _rand(g, 1, 4, 1, 4, 4), _rand(g, 1, 6, 16), _rand(g, 1, 8)
    mask = torch.ones(1, 6, dtype=torch.long)
    return lambda t: dict(hidden_states=x, timestep=torch.tensor([int(t)]), encoder_hidden_states=e,
                          encoder_attention_mask=mask, pooled_projections=p, guidance=torch.tensor([3000.0]))


def _hunyuan_video15():
    return diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_refiner_layers=1,
        text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 4, 2))


def _hunyuan_video15_inputs(g: torch.Generator):
    x, e, e2 = _rand(g, 1, 4, 1, 4, 4), _rand(g, 1, 6, 16), _rand(g, 1, 3, 8)
    img = torch.zeros(1, 2, 8)
    m, m2 = torch.ones(1, 6, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    return lambda t: dict(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=e,
                          encoder_attention_mask=m, encoder_hidden_states_2=e2, encoder_attention_mask_2=m2,
                          image_embeds=img)


def _hunyuan_image():
    return diffusers.HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=2,
        num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(4, 4))


def _hunyuan_image_inputs(g: torch.Generator):
    x, e = _rand(g, 1, 4, 4, 4), _rand(g, 1, 6, 16)
    mask = torch.ones(1, 6, dtype=torch.long)
    return lambda t: dict(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=e,
                          encoder_attention_mask=mask)


def _ltx():
    return diffusers.LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                attention_head_dim=8, cross_attention_dim=16, num_layers=2,
                                                caption_channels=16)


def _ltx_inputs(g: torch.Generator):
    x, e = _rand(g, 1, 16, 4), _rand(g, 1, 6, 16)
    mask = torch.ones(1, 6, dtype=torch.long)
    return lambda t: dict(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([int(t)]),
                          encoder_attention_mask=mask, num_frames=1, height=4, width=4)


def _mochi():
    return diffusers.MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                             pooled_projection_dim=16, in_channels=4, text_embed_dim=16,
                                             time_embed_dim=4, max_sequence_length=8)


def _mochi_inputs(g: torch.Generator):
    x, e = _rand(g, 1, 4, 1, 8, 8), _rand(g, 1, 8, 16)
    mask = torch.ones(1, 8, dtype=torch.long)
    return lambda t: dict(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([int(t)]),
                          encoder_attention_mask=mask)


def _motif_video():
    return diffusers.MotifVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                  attention_head_dim=8, num_layers=1, num_single_layers=2,
                                                  patch_size=1, text_embed_dim=16, rope_axes_dim=(2, 4, 2))


def _motif_video_inputs(g: torch.Generator):
    x, e = _rand(g, 1, 4, 1, 4, 4), _rand(g, 1, 6, 16)
    mask = torch.ones(1, 6, dtype=torch.long)
    return lambda t: dict(hidden_states=x, timestep=torch.tensor([int(t)]), encoder_hidden_states=e,
                          encoder_attention_mask=mask)


def _qwenimage():
    return diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                                 axes_dims_rope=(8, 4, 4))


def _qwenimage_inputs(g: torch.Generator):
    x, e = _rand(g, 1, 16, 16), _rand(g, 1, 6, 16)
    mask = torch.ones(1, 6, dtype=torch.long)
    return lambda t: dict(hidden_states=x, encoder_hidden_states=e, encoder_hidden_states_mask=mask,
                          timestep=torch.tensor([t / 1000]), img_shapes=[(1, 4, 4)])


def _zimage():
    return diffusers.ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                              n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                              axes_dims=[8, 4, 4], axes_lens=[64, 32, 32])


def _zimage_inputs(g: torch.Generator):
    x, e = _rand(g, 4, 1, 8, 8), _rand(g, 6, 16)
    return lambda t: dict(x=[x], t=torch.tensor([t / 1000]), cap_feats=[e])


def _kandinsky5():
    return diffusers.Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
                                                  out_visual_dim=4, patch_size=(1, 2, 2), model_dim=32, ff_dim=64,
                                                  num_text_blocks=1, num_visual_blocks=2, axes_dims=(8, 4, 4))


def _kandinsky5_inputs(g: torch.Generator):
    x, e, p = _rand(g, 1, 1, 8, 8, 4), _rand(g, 1, 6, 16), _rand(g, 1, 8)
    return lambda t: dict(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([t]), pooled_projections=p,
                          visual_rope_pos=[torch.arange(1), torch.arange(4), torch.arange(4)],
                          text_rope_pos=torch.arange(6))


FLUX = Family(_flux, _flux_like_inputs(16, 32, pooled=32))
BRIA = Family(_bria, _flux_like_inputs(16, 32))
FLUX2 = Family(_flux2, _flux_like_inputs(16, 32, guidance=True, ids=4))
HUNYUAN_VIDEO = Family(_hunyuan_video(), _hunyuan_video_inputs)
HUNYUAN_VIDEO_I2V = Family(_hunyuan_video("token_replace"), _hunyuan_video_inputs)
MOTIF_VIDEO = Family(_motif_video, _motif_video_inputs)
HUNYUAN_IMAGE = Family(_hunyuan_image, _hunyuan_image_inputs)

#: Family of every block class, by class name: diffusers' registry and budcache's BLOCK_CONTRACTS.
FAMILIES: dict[str, Family] = {
    "BasicTransformerBlock": Family(_dit, _dit_inputs),  # DiTTransformer2DModel (also PixArt, Latte, ...)
    "CogVideoXBlock": Family(_cogvideox, _cogvideox_inputs),
    "CogView4TransformerBlock": Family(_cogview4, _cogview4_inputs),
    "BriaTransformerBlock": BRIA,  # budcache's table (the registry's row has the outputs swapped)
    "BriaSingleTransformerBlock": BRIA,  # budcache's table
    "FluxTransformerBlock": FLUX,
    "FluxSingleTransformerBlock": FLUX,
    "Flux2TransformerBlock": FLUX2,
    "Flux2SingleTransformerBlock": FLUX2,
    "HunyuanVideoTransformerBlock": HUNYUAN_VIDEO,
    "HunyuanVideoSingleTransformerBlock": HUNYUAN_VIDEO,
    "HunyuanVideoTokenReplaceTransformerBlock": HUNYUAN_VIDEO_I2V,
    "HunyuanVideoTokenReplaceSingleTransformerBlock": HUNYUAN_VIDEO_I2V,
    "LTXVideoTransformerBlock": Family(_ltx, _ltx_inputs),
    "MochiTransformerBlock": Family(_mochi, _mochi_inputs),
    "MotifVideoTransformerBlock": MOTIF_VIDEO,
    "MotifVideoSingleTransformerBlock": MOTIF_VIDEO,
    "WanTransformerBlock": Family(_wan, _wan_inputs),
    "QwenImageTransformerBlock": Family(_qwenimage, _qwenimage_inputs),
    "HunyuanImageTransformerBlock": HUNYUAN_IMAGE,
    "HunyuanImageSingleTransformerBlock": HUNYUAN_IMAGE,
    "ZImageTransformerBlock": Family(_zimage, _zimage_inputs),
    "JointTransformerBlock": Family(_sd3, _sd3_inputs),  # SD3Transformer2DModel
    "Kandinsky5TransformerDecoderBlock": Family(_kandinsky5, _kandinsky5_inputs),
    "HunyuanVideo15TransformerBlock": Family(_hunyuan_video15, _hunyuan_video15_inputs),  # budcache's table
}

#: Block classes of the registry whose family this test cannot drive, with the reason (also in README.md).
SKIPPED: dict[str, str] = {
    "Cosmos3VLTextMoTDecoderLayer": "Cosmos3OmniTransformer takes a packed multimodal token sequence (text ids, "
                                    "vision token indexes, mixed-modality rope) that no tiny config drives alone",
}


def _registry_names() -> list[str]:
    TransformerBlockRegistry.get(diffusers.models.attention.BasicTransformerBlock)  # fills diffusers' registry
    return sorted({cls.__name__ for cls in TransformerBlockRegistry._registry} | set(BLOCK_CONTRACTS))


def test_every_registered_block_class_has_a_family_or_a_reason():
    missing = [n for n in _registry_names() if n not in FAMILIES and n not in SKIPPED]
    assert not missing, f"block classes without a tiny family in this test: {missing}"


class _Steps:
    """The host state of a scheduler: N timesteps and the current step index (``None`` before the first step)."""

    def __init__(self, steps: int) -> None:
        self.timesteps = torch.linspace(1000.0, 1000.0 / steps, steps)
        self.begin_index = 0
        self.step_index: int | None = None


class _BlockRuns:
    """Counts the model calls in which each block of the stack really ran (one of its sub-modules was called)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.call = 0
        self.seen: set[tuple[int, int]] = set()
        self.blocks = [b for _, b in block_stack(transformer)]
        self._handles = [transformer.register_forward_pre_hook(self._next_call)]
        for i, b in enumerate(self.blocks):
            for child in b.children():
                self._handles.append(child.register_forward_pre_hook(lambda *a, i=i: self.seen.add((self.call, i))))

    def _next_call(self, *args: Any) -> None:
        self.call += 1

    def per_block(self) -> list[int]:
        return [sum(1 for _, j in self.seen if j == i) for i in range(len(self.blocks))]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _first(out: Any) -> torch.Tensor:
    x = out[0]
    return torch.stack(list(x)) if isinstance(x, (list, tuple)) else x


def _drive(model: torch.nn.Module, call: Callable[[float], dict[str, Any]], steps: _Steps) -> list[torch.Tensor]:
    """The minimal denoising loop: one transformer call per step, the step index advanced on the host."""
    outs = []
    with torch.no_grad():
        for i, t in enumerate(steps.timesteps.tolist()):
            steps.step_index = i
            outs.append(_first(model(**call(t), return_dict=False)))
    steps.step_index = None
    return outs


_BUILT: dict[int, tuple[torch.nn.Module, Callable[[float], dict[str, Any]]]] = {}


def _build(name: str) -> tuple[torch.nn.Module, Callable[[float], dict[str, Any]]]:
    """The family's tiny model (built once per module run) and its inputs; the model must hold block ``name``."""
    fam = FAMILIES[name]
    if id(fam) not in _BUILT:
        torch.manual_seed(0)
        _BUILT[id(fam)] = (fam.model().eval(), fam.inputs(torch.Generator().manual_seed(1)))
    model, call = _BUILT[id(fam)]
    classes = {type(b).__name__ for m in model.children() if isinstance(m, torch.nn.ModuleList) for b in m}
    assert name in classes, f"the tiny model of {name} has blocks {sorted(classes)}"
    return model, call


def _params() -> list[Any]:
    out = []
    for name in _registry_names():
        if name in SKIPPED:
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=SKIPPED[name])))
        elif name in FAMILIES:
            out.append(name)
    return out


@pytest.mark.parametrize("name", _params())
def test_k_of_n_policy_runs_every_block_k_times_and_full_policy_is_bit_exact(name):
    model, call = _build(name)
    steps = _Steps(N)
    plain = _drive(model, call, steps)

    bd.apply(model, CachePolicy.full(N), scheduler=steps)
    try:
        full = _drive(model, call, steps)
    finally:
        bd.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(full, plain))

    runs = _BlockRuns(model)
    handle = bd.apply(model, CachePolicy.uniform(N, K), scheduler=steps)
    try:
        cached = _drive(model, call, steps)
    finally:
        bd.remove(model)
        runs.close()
    assert runs.per_block() == [K] * len(runs.blocks)
    assert handle.stats.stack_runs == K and handle.stats.calls == N
    assert all(torch.isfinite(c).all() for c in cached)
    # after remove the transformer is the plain one again
    assert all(torch.equal(a, b) for a, b in zip(_drive(model, call, steps), plain))


@pytest.mark.parametrize("name", _params())
def test_a_skipped_step_at_an_unchanged_input_reproduces_the_computed_output(name):
    """With the timestep and latents held fixed, every step's stack input is the same, so the reused residual
    must give back the computed output: a stream read from the wrong output index, a text stream taken for the
    image stream or a joined stream split in the wrong place would not."""
    model, call = _build(name)
    steps = _Steps(N)
    steps.timesteps = torch.full((N,), 500.0)
    plain = _drive(model, call, steps)
    bd.apply(model, CachePolicy.uniform(N, K), scheduler=steps, mechanism="reuse")
    try:
        cached = _drive(model, call, steps)
    finally:
        bd.remove(model)
    for a, b in zip(cached, plain):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())


def test_a_stack_whose_streams_are_re_laid_without_a_contract_is_a_one_line_config_error(monkeypatch):
    """FLUX.2 joins (e, h) between its block lists; without the joined contract the residual is undefined."""
    model, call = _build("Flux2SingleTransformerBlock")
    steps = _Steps(N)
    plain = _drive(model, call, steps)
    monkeypatch.setitem(BLOCK_CONTRACTS, "Flux2SingleTransformerBlock", BlockContract(hidden_out=0))
    with pytest.raises(ConfigError, match="re-lays its streams") as err:
        bd.apply(model, CachePolicy.uniform(N, K), scheduler=steps)
        _drive(model, call, steps)
    bd.remove(model)
    assert "\n" not in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(_drive(model, call, steps), plain))


def test_joined_stream_with_extra_tokens_is_a_one_line_config_error():
    """A joined stream longer than text + image (FLUX.2's reference-image tokens) has no residual: refused."""
    model, call = _build("Flux2SingleTransformerBlock")
    steps = _Steps(N)

    def two_more_tokens(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        h, rope = kwargs["hidden_states"], kwargs["image_rotary_emb"]
        if module is model.single_transformer_blocks[0]:
            h = torch.cat([h[:, :2], h], dim=1)
        rope = tuple(torch.cat([r[:2], r]) for r in rope)
        return args, {**kwargs, "hidden_states": h, "image_rotary_emb": rope}

    extra = [b.register_forward_pre_hook(two_more_tokens, with_kwargs=True) for b in model.single_transformer_blocks]
    try:
        with pytest.raises(ConfigError, match="joined stream of") as err:
            bd.apply(model, CachePolicy.uniform(N, K), scheduler=steps)
            _drive(model, call, steps)
    finally:
        bd.remove(model)
        for h in extra:
            h.remove()
    assert "\n" not in str(err.value)
