"""Search on diffusers pipelines: PipelineProblem equals the pipeline, and `budcache search --pipeline` runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

import budcache.diffusers as bd
from budcache import CachePolicy, ConfigError, tinyflow
from budcache.cli import main
from budcache.problems.metrics import item_metrics
from budcache.problems.pipeline import PipelineProblem, load_embeddings, load_pipeline, save_embeddings
from helpers import make_sd3_pipeline, make_transformer, make_wan_pipeline

torch.set_num_threads(1)
PROMPTS = ["a red circle", "two blue squares", "a large yellow triangle", "three circles"]


@pytest.fixture(scope="module")
def tf():
    return tinyflow.load()


@pytest.fixture(scope="module")
def flux_dir(tf, tmp_path_factory):
    """tinyflow's FluxPipeline saved to disk (no VAE, no text encoders) and a matching embeddings file."""
    d = tmp_path_factory.mktemp("flux")
    tf.pipeline().save_pretrained(d)
    c, u = tf.encode(PROMPTS), tf.encode([""])
    save_embeddings(d / "emb.safetensors", PROMPTS, c.prompt_embeds, c.pooled_prompt_embeds, u.prompt_embeds,
                    u.pooled_prompt_embeds)
    return d


def _flux_reference(pipe, tf, prompts, seeds, steps, guidance):
    c = tf.encode(PROMPTS).select(torch.tensor([PROMPTS.index(p) for p in prompts]))  # as in the embeddings file
    kw = dict(prompt_embeds=c.prompt_embeds, pooled_prompt_embeds=c.pooled_prompt_embeds, height=128, width=128,
              num_inference_steps=steps, output_type="latent",
              generator=[torch.Generator().manual_seed(s) for s in seeds])
    if guidance != 1.0:
        u = tf.encode([""]).tile(len(prompts))
        kw.update(negative_prompt_embeds=u.prompt_embeds, negative_pooled_prompt_embeds=u.pooled_prompt_embeds,
                  true_cfg_scale=guidance)
    with torch.no_grad():
        return pipe(**kw).images


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_flux_problem_equals_the_pipeline(flux_dir, tf, guidance):
    pipe = load_pipeline(str(flux_dir))
    pb = PipelineProblem(pipe, steps=8, guidance=guidance, height=128, width=128,
                         embeddings=flux_dir / "emb.safetensors")
    assert pb.latent_shape == (64, 48)
    assert torch.allclose(pb.sigmas(8), tf.sigmas(8), atol=1e-6)  # the resolution shift is the pipeline's
    prompts, seeds = PROMPTS[:2], [3, 4]
    cond, uncond = pb.conds(prompts)
    with torch.no_grad():
        s = pb.make_sampler(None)
        full = s.run(s.start(pb.noise(seeds)), cond, uncond).x
        pol = CachePolicy.uniform(8, 4)
        s = pb.make_sampler(pol)
        cached = s.run(s.start(pb.noise(seeds)), cond, uncond).x
    assert torch.equal(full, _flux_reference(pipe, tf, prompts, seeds, 8, guidance))
    bd.apply(pipe, pol)
    try:
        ref = _flux_reference(pipe, tf, prompts, seeds, 8, guidance)
    finally:
        bd.remove(pipe)
    assert torch.allclose(cached, ref, atol=1e-5)
    assert not torch.allclose(cached, full, atol=1e-4)


def _wan_pipe():
    return make_wan_pipeline(), dict(height=64, width=64, num_frames=1), "frames"


def _sd3_pipe():
    return make_sd3_pipeline(), dict(height=64, width=64), "images"


@pytest.mark.parametrize("build", [_wan_pipe, _sd3_pipe], ids=["wan", "sd3"])
def test_wan_and_sd3_problems_equal_their_pipelines(build, tmp_path):
    pipe, geo, field = build()
    g = torch.Generator().manual_seed(1)
    pe, npe = torch.randn(2, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    sd3 = isinstance(pipe, StableDiffusion3Pipeline)
    pooled, npooled = (torch.randn(2, 8, generator=g), torch.randn(1, 8, generator=g)) if sd3 else (None, None)
    save_embeddings(tmp_path / "e.safetensors", ["p0", "p1"], pe, pooled, npe, npooled)
    pb = PipelineProblem(pipe, steps=6, guidance=3.0, embeddings=tmp_path / "e.safetensors", **geo)
    cond, uncond = pb.conds(["p0", "p1"])
    with torch.no_grad():
        s = pb.make_sampler(None)
        ours = s.run(s.start(pb.noise([5, 6])), cond, uncond).x
        kw = dict(prompt_embeds=pe, negative_prompt_embeds=npe.expand(2, -1, -1), guidance_scale=3.0,
                  num_inference_steps=6, output_type="latent",
                  generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], **geo)
        if sd3:
            kw.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=npooled.expand(2, -1))
        ref = getattr(pipe(**kw), field)
    # the pipeline may batch CFG's two passes into one call: equal up to float rounding
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_search_cli_on_a_pipeline_end_to_end(flux_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["search", "--pipeline", str(flux_dir), "--embeddings", str(flux_dir / "emb.safetensors"),
               "--height", "128", "--width", "128", "--steps", "8", "--nfe", "4", "--calib-pairs", "4",
               "--heldout", "3", "--sa-iters", "6", "--hc-rounds", "2", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    pol = CachePolicy.load(out / "policy_N8_K4.json")
    assert pol.nfe == 4 and pol.steps == 8
    assert pol.meta["model"] == f"pipeline:{flux_dir}"
    assert pol.meta["schedule"] == "scheduler:FlowMatchEulerDiscreteScheduler"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["model"] == f"pipeline:{flux_dir}"
    assert summary["budgets"][0]["heldout"]["_n"]["pairs"] == 3
    # the searched policy drives the same pipeline through budcache.diffusers.apply
    pipe = load_pipeline(str(flux_dir))
    bd.apply(pipe, out / "policy_N8_K4.json")
    try:
        tf = tinyflow.load()
        c = tf.encode(PROMPTS[:1])
        lat = pipe(prompt_embeds=c.prompt_embeds, pooled_prompt_embeds=c.pooled_prompt_embeds, height=128, width=128,
                   num_inference_steps=8, output_type="latent").images
    finally:
        bd.remove(pipe)
    assert lat.shape == (1, 64, 48) and torch.isfinite(lat).all()


def test_pipeline_errors_name_the_problem(flux_dir, tmp_path, capsys):
    pipe = load_pipeline(str(flux_dir))
    with pytest.raises(ConfigError, match="no text encoder"):
        PipelineProblem(pipe, steps=4, height=128, width=128).conds(["a red circle"])
    with pytest.raises(ConfigError, match="needs calibration prompts"):
        PipelineProblem(pipe, steps=4, height=128, width=128).prompts(4, 0)
    pb = PipelineProblem(pipe, steps=4, height=128, width=128, embeddings=flux_dir / "emb.safetensors")
    with pytest.raises(ConfigError, match="not in the embeddings file"):
        pb.conds(["a green star"])
    with pytest.raises(ConfigError, match="not supported"):
        PipelineProblem(object(), steps=4)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(ConfigError, match="not a valid safetensors"):
        load_embeddings(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_embeddings(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="rows|shape"):
        save_embeddings(tmp_path / "x.safetensors", ["a", "b"], torch.zeros(3, 2, 2))
    with pytest.raises(ConfigError, match="offline"):
        load_pipeline(str(tmp_path / "nowhere"))
    assert main(["search", "--embeddings", "x.safetensors", "--out", str(tmp_path / "o")]) == 2
    assert "only with --pipeline" in capsys.readouterr().err
    rc = main(["search", "--pipeline", str(flux_dir), "--model", "m", "--embeddings",
               str(flux_dir / "emb.safetensors"), "--height", "128", "--width", "128", "--out", str(tmp_path / "o")])
    assert rc == 2 and "exclude each other" in capsys.readouterr().err


def test_quality_falls_back_to_latent_psnr_without_a_decoder():
    class NoDecoder:
        def images(self, latents):
            return None

    teacher = torch.linspace(-1, 1, 8).repeat(2, 1)
    latents = teacher + torch.tensor([[0.1], [0.01]])
    q = item_metrics(NoDecoder(), latents, teacher)
    # range 2 -> peak 4; MSE 1e-2 and 1e-4 -> 26.02 and 46.02 dB
    assert q["psnr"] == pytest.approx([26.0206, 46.0206], abs=1e-3)
    assert q["latent_mse"] == pytest.approx([1e-2, 1e-4], rel=1e-4)


def test_reports_decode_through_the_pipelines_vae(tmp_path):
    from diffusers import AutoencoderKL, FluxPipeline

    from helpers import make_transformer

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, shift_factor=0.1, scaling_factor=0.5).eval()
    pipe = FluxPipeline(scheduler=tinyflow.scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=make_transformer())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    pe, pooled = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    save_embeddings(tmp_path / "e.safetensors", ["p"], pe, pooled)
    pb = PipelineProblem(pipe, steps=4, height=16, width=16, embeddings=tmp_path / "e.safetensors")
    cond, _ = pb.conds(["p"])
    with torch.no_grad():
        s = pb.make_sampler(None)
        lat = s.run(s.start(pb.noise([2])), cond).x
        ref = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, height=16, width=16, num_inference_steps=4,
                   output_type="pt", generator=torch.Generator().manual_seed(2)).images
    ours = pb.images(lat)
    assert ours.shape == ref.shape == (1, 3, 16, 16)
    assert torch.allclose(ours, ref, atol=1e-5)
    q = item_metrics(pb, lat, lat + 0.01)
    assert q["psnr"][0] > 20


def test_align_cli_on_a_pipeline_end_to_end(flux_dir, tmp_path, capsys):
    out = tmp_path / "align"
    pol = CachePolicy.uniform(6, 3, meta={"mechanism": "reuse"})
    pol.save(tmp_path / "p.json")
    rc = main(["align", "--pipeline", str(flux_dir), "--embeddings", str(flux_dir / "emb.safetensors"),
               "--height", "128", "--width", "128", "--policy", str(tmp_path / "p.json"), "--calib-pairs", "4",
               "--heldout", "2", "--epochs", "1", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    aligned = CachePolicy.load(out / "policy_aligned_N6_K3.json")
    assert aligned.compute == pol.compute and aligned.sigmas is not None and len(aligned.sigmas) == 7
    summary = json.loads((out / "summary.json").read_text())
    assert "psnr" in json.dumps(summary)


def test_compare_cli_on_a_pipeline_without_a_vae(flux_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--pipeline", str(flux_dir), "--embeddings", str(flux_dir / "emb.safetensors"),
               "--height", "128", "--width", "128", "--steps", "6", "--nfe", "3", "--methods",
               "budcache,uniform,plain,fbcache", "--calib-pairs", "3", "--eval-pairs", "2", "--sa-iters", "3",
               "--hc-rounds", "1", "--no-transfer", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"budcache", "uniform", "plain", "fbcache"}
    assert rows["uniform"]["nfe_mean"] == 3 and rows["plain"]["nfe_mean"] == 3
    assert all(math.isfinite(r["psnr"]) and r["latent_mse"] >= 0 for r in rows.values())
    assert not list(out.glob("grid_*.png"))  # no VAE, nothing to draw


def _word_tokenizer(max_length: int):
    """A tiny word-level fast tokenizer (no download): lower-case words, [PAD]/[UNK]/[EOS]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]", "a", "red", "circle", "two", "squares", "blue", "triangle", "small"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                   model_max_length=max_length)


@torch.no_grad()
def test_prompts_are_encoded_by_the_pipelines_own_text_encoders(tf):
    """A FluxPipeline with tiny random CLIP and T5 encoders: the problem's conditioning is the pipeline's own."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=11, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16, eos_token_id=2,
                                        projection_dim=32)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=11, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2)).eval()
    pipe = FluxPipeline(scheduler=tinyflow.scheduler(), vae=None, text_encoder=clip, tokenizer=_word_tokenizer(16),
                        text_encoder_2=t5, tokenizer_2=_word_tokenizer(16), transformer=make_transformer())
    pipe.vae_scale_factor, pipe.default_sample_size = 2, 16
    pipe.set_progress_bar_config(disable=True)
    pp = PipelineProblem(pipe, steps=4, guidance=2.0, negative_prompt="a blue triangle")
    prompts = ["a red circle", "two squares", "a red circle"]
    cond, uncond = pp.conds(prompts)
    pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None)
    npe, npooled, _ = pipe.encode_prompt(prompt=["a blue triangle"] * 3, prompt_2=None)
    assert torch.allclose(cond.pooled_prompt_embeds, pooled) and torch.allclose(uncond.pooled_prompt_embeds, npooled)
    assert torch.allclose(cond.prompt_embeds, pe, atol=1e-6) and torch.allclose(uncond.prompt_embeds, npe, atol=1e-6)
    assert not torch.equal(cond.prompt_embeds[0], cond.prompt_embeds[1])  # different prompts, different states
