"""FLUX.2, Qwen-Image, Z-Image and HunyuanVideo 1.5 as budcache problems: adapters equal the pipelines' own
transformer calls, noise and sigmas equal theirs, and search, apply, align and compare run end to end."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.guiders import ClassifierFreeGuidance

import budcache
import budcache.diffusers as bd
from budcache import ConfigError
from budcache.align.trainer import AlignConfig
from budcache.compare import CompareConfig
from budcache.denoisers import ADAPTERS
from budcache.hooks import CacheHandle, _block_stack, find_cache
from budcache.problems import FAMILIES, SamplerSettings
from budcache.problems.pipeline import PipelineProblem, save_embeddings

torch.set_num_threads(1)
PROMPTS = ["p0", "p1"]


def _scheduler(**kw: Any) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**kw)


def _flux2() -> Flux2Pipeline:
    torch.manual_seed(0)
    t = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
                                axes_dims_rope=(4, 4, 4, 4)).eval()
    return Flux2Pipeline(scheduler=_scheduler(use_dynamic_shifting=True, time_shift_type="exponential"), vae=None,
                         text_encoder=None, tokenizer=None, transformer=t)


def _qwen() -> QwenImagePipeline:
    torch.manual_seed(0)
    t = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                                    num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    return QwenImagePipeline(scheduler=_scheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
                             vae=None, text_encoder=None, tokenizer=None, transformer=t)


def _zimage() -> ZImagePipeline:
    torch.manual_seed(0)
    t = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                 n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
                                 axes_lens=[64, 32, 32]).eval()
    return ZImagePipeline(scheduler=_scheduler(use_dynamic_shifting=True, time_shift_type="exponential"), vae=None,
                          text_encoder=None, tokenizer=None, transformer=t)


def _hv15() -> HunyuanVideo15Pipeline:
    torch.manual_seed(0)
    t = HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=2, num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8,
                                         image_embed_dim=8, rope_axes_dim=(2, 2, 4), target_size=64,
                                         task_type="t2v").eval()
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)
    return HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=t, vae=vae.eval(),
                                  scheduler=_scheduler(shift=5.0), text_encoder_2=None, tokenizer_2=None,
                                  guider=ClassifierFreeGuidance(guidance_scale=1.0))


@dataclass
class Case:
    """One family: a tiny pipeline, its embeddings, and how its own loop is called on them."""

    name: str
    build: Any
    geo: dict[str, int]
    text_dim: int

    def pipe(self) -> Any:
        p = self.build()
        p.set_progress_bar_config(disable=True)
        return p

    def embeddings(self, path: Any) -> dict[str, torch.Tensor]:
        """Random text states for PROMPTS (the second prompt padded: one token masked) written to ``path``."""
        g = torch.Generator().manual_seed(1)
        pe = torch.randn(2, 6, self.text_dim, generator=g)
        mask = torch.ones(2, 6, dtype=torch.int64)
        if self.name in ("zimage", "hv15"):  # encoders that pad: the padding rows are masked
            mask[1, -1] = 0
        emb = {"prompt_embeds": pe, "prompt_embeds_mask": mask}
        if self.name == "hv15":
            emb.update(prompt_embeds_2=torch.randn(2, 3, 8, generator=g), prompt_embeds_mask_2=torch.ones(2, 3))
        save_embeddings(path, PROMPTS, **emb)
        return emb

    def pipe_kwargs(self, emb: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The embeddings as the pipeline's own ``__call__`` takes them, without guidance."""
        if self.name == "flux2":
            return {"prompt_embeds": emb["prompt_embeds"]}
        if self.name == "qwen":
            return {"prompt_embeds": emb["prompt_embeds"], "prompt_embeds_mask": emb["prompt_embeds_mask"]}
        if self.name == "zimage":
            m = emb["prompt_embeds_mask"].bool()
            return {"prompt_embeds": [e[k] for e, k in zip(emb["prompt_embeds"], m)], "guidance_scale": 0.0}
        return {k: emb[k] for k in ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")}


CASES = [Case("flux2", _flux2, {"height": 64, "width": 64}, 32),
         Case("qwen", _qwen, {"height": 64, "width": 64}, 16),
         Case("zimage", _zimage, {"height": 64, "width": 64}, 16),
         Case("hv15", _hv15, {"height": 64, "width": 64, "num_frames": 1}, 16)]
IDS = [c.name for c in CASES]


def _problem(case: Case, pipe: Any, tmp_path: Any, **settings: Any) -> tuple[PipelineProblem, dict]:
    emb = case.embeddings(tmp_path / "emb.safetensors")
    pp = PipelineProblem(pipe, settings=SamplerSettings(**settings), embeddings=tmp_path / "emb.safetensors",
                         **case.geo)
    return pp, emb


def _pipeline_latents(case: Case, pipe: Any, emb: dict, seeds: list[int], steps: int) -> torch.Tensor:
    out = pipe(**case.pipe_kwargs(emb), num_inference_steps=steps, output_type="latent",
               generator=[torch.Generator().manual_seed(s) for s in seeds], **case.geo)
    return out.frames if case.name == "hv15" else out.images


class Calls:
    """Records every call of the transformer (its keyword arguments and output)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[tuple, dict, Any]] = []
        self._h = model.register_forward_hook(lambda m, a, k, o: self.calls.append((a, k, o)), with_kwargs=True)

    def close(self) -> None:
        self._h.remove()


def test_every_new_family_has_a_record_and_an_adapter():
    for cls in ("Flux2Pipeline", "QwenImagePipeline", "ZImagePipeline", "HunyuanVideo15Pipeline"):
        assert cls in FAMILIES
        assert FAMILIES[cls].transformer in ADAPTERS


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapter_equals_the_pipelines_transformer_call(case, tmp_path):
    pipe = case.pipe()
    pp, emb = _problem(case, pipe, tmp_path, steps=3)
    rec = Calls(pipe.transformer)
    try:
        with torch.no_grad():
            _pipeline_latents(case, pipe, emb, [5, 6], 3)
    finally:
        rec.close()
    assert len(rec.calls) == 3
    args, kwargs, out = rec.calls[1]  # the second step: a non-trivial latent and sigma
    cond, _ = pp.conds(PROMPTS)
    den = pp.denoiser()
    x = args[0] if args else kwargs["hidden_states"]
    if case.name == "zimage":  # the model takes a list of (C, 1, H, W) latents and predicts -v
        x = torch.stack(x).squeeze(2)
        ref = -torch.stack([o.float() for o in out[0]]).squeeze(2)
    else:
        ref = out[0]
    if case.name == "hv15":  # the input carries the zero condition channels
        x = x[:, : pipe.num_channels_latents]
    with torch.no_grad():
        ours = den(x, pp.sigmas(3)[1].expand(2), cond, "cond")
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_noise_and_sigmas_are_the_pipelines(case, tmp_path):
    pipe = case.pipe()
    pp, emb = _problem(case, pipe, tmp_path, steps=4)
    sched = pipe.scheduler
    with torch.no_grad():
        latents = _pipeline_latents(case, pipe, emb, [3, 4], 4)
    assert torch.equal(sched.sigmas.float(), pp.sigmas(4).float())  # the pipeline's run left its sigmas here
    rec = Calls(pipe.transformer)
    try:
        with torch.no_grad():
            _pipeline_latents(case, pipe, {k: v[:1] for k, v in emb.items()}, [3], 1)
    finally:
        rec.close()
    args, kwargs, _ = rec.calls[0]
    x = args[0] if args else kwargs["hidden_states"]
    x = torch.stack(x).squeeze(2) if case.name == "zimage" else x
    x = x[:, : pipe.num_channels_latents] if case.name == "hv15" else x
    assert torch.equal(pp.noise([3]), x)
    # and the whole plain run of the problem's sampler lands where the pipeline does
    cond, _ = pp.conds(PROMPTS)
    with torch.no_grad():
        s = pp.make_sampler(None)
        ours = s.run(s.start(pp.noise([3, 4])), cond).x
    assert torch.allclose(ours, latents, atol=1e-5, rtol=1e-5)


def _stack_runs(pipe: Any) -> Any:
    """Counts block-stack computations: the first block's attention runs only when the stack computes."""
    first = _block_stack(pipe.transformer)[0][1]
    attn = getattr(first, "attn", None) or first.attention
    runs: list[int] = []
    h = attn.register_forward_pre_hook(lambda m, a: runs.append(1))
    return runs, h


def _end_to_end(case: Case, mechanism: str, tmp_path: Any) -> None:
    pipe = case.pipe()
    pp, emb = _problem(case, pipe, tmp_path, steps=4, mechanism=mechanism)
    outcome, = budcache.search(tmp_path / "s", nfes=[2], problem=pp, calib_pairs=2, heldout_pairs=1, sa_iters=2,
                               hc_rounds=1, estimators=None, progress=False)
    policy = outcome.policy
    assert policy.nfe == 2 and policy.steps == 4
    assert math.isfinite(outcome.heldout["budcache"]["psnr"])
    bd.apply(pipe, policy)
    try:
        handle = find_cache(pipe.transformer)
        assert isinstance(handle, CacheHandle)
        rec = Calls(pipe.transformer)
        with torch.no_grad():
            lat = _pipeline_latents(case, pipe, {k: v[:1] for k, v in emb.items()}, [0], 4)
        rec.close()
    finally:
        bd.remove(pipe)
    assert torch.isfinite(lat).all()
    runs, h = _stack_runs(pipe)
    try:
        bd.apply(pipe, policy)
        with torch.no_grad():
            _pipeline_latents(case, pipe, {k: v[:1] for k, v in emb.items()}, [0], 4)
    finally:
        bd.remove(pipe)
        h.remove()
    assert len(runs) == policy.nfe  # exactly K block-stack computations
    job = budcache.align(tmp_path / "a", policy=policy, problem=pp, config=AlignConfig(epochs=1, accumulation=1),
                         calib_pairs=2, heldout_pairs=1, progress=False)
    assert job.policy.compute == policy.compute
    cfg = CompareConfig(nfes=(2,), steps=4, methods=("budcache", "plain"), calib_pairs=2, eval_pairs=2,
                        transfer=False, search_kw={"sa_iters": 2, "hc_rounds": 1})
    res = budcache.compare(tmp_path / "c", cfg, progress=False, problem=pp)
    rows = {r["method"]: r for r in res.rows}
    assert set(rows) == {"budcache", "plain"}
    assert all(math.isfinite(r["psnr"]) for r in rows.values())


@pytest.mark.parametrize("mechanism", ["forecast1", "vtaylor1"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_search_apply_align_compare_end_to_end(case, mechanism, tmp_path):
    _end_to_end(case, mechanism, tmp_path)


def test_family_errors_are_one_line(tmp_path):
    pipe = _hv15()
    save_embeddings(tmp_path / "e.safetensors", PROMPTS, torch.zeros(2, 3, 16))
    pp = PipelineProblem(pipe, steps=4, height=64, width=64, embeddings=tmp_path / "e.safetensors")
    with pytest.raises(ConfigError, match="prompt_embeds_2"):
        pp.conds(PROMPTS)
    with pytest.raises(ConfigError, match="unknown embeddings"):
        save_embeddings(tmp_path / "x.safetensors", PROMPTS, torch.zeros(2, 3, 16), prompt_mask=torch.ones(2, 3))
    with pytest.raises(ConfigError, match="num-frames"):
        PipelineProblem(_zimage(), steps=4, height=64, width=64, num_frames=3)
