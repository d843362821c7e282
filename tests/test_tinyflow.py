"""Tests for tinyflow: grammar, renderer, checker, latent packing, offline loading and resumable training."""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import json
import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from safetensors.torch import load_file

import budcache
from budcache import tinyflow
from budcache.errors import ConfigError
from budcache.tinyflow import checker, grammar, render
from budcache.tinyflow.grammar import ObjectSpec, SceneObject, Spec, TemplateMix
from budcache.tinyflow.model import (
    TRANSFORMER_CONFIG,
    TinyTextEncoder,
    image_ids,
    image_to_latent,
    latent_to_image,
    new_transformer,
)
from budcache.tinyflow.train import TrainConfig, export_weights, make_batch, monitor, train

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- checker on true renders
@pytest.mark.parametrize("layout", grammar.PAIR_LAYOUTS)
def test_checker_accepts_fresh_renders_of_random_specs(layout):
    rng = np.random.default_rng(20240607)
    specs = [grammar.sample_spec(rng, TemplateMix(empty=0.0)) for _ in range(2000)]
    scenes = [grammar.realise(s, rng, pair_layout=layout) for s in specs]
    images = render.render(scenes)
    assert images.shape == (2000, 3, 32, 32)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    verdicts = [checker.check_spec(s, im) for s, im in zip(specs, images)]
    failures = [(grammar.prompt_of(s), v.reason) for s, v in zip(specs, verdicts) if not v.ok]
    accuracy = 1 - len(failures) / len(specs)
    assert accuracy >= 0.99, failures[:10]
    assert failures == []  # the renderer and checker agree exactly on true renders
    # every template was exercised
    assert {s.template for s in specs} == {"single", "pair", "count"}


def test_accuracy_over_prompts():
    rng = np.random.default_rng(3)
    specs = [grammar.sample_spec(rng, TemplateMix(empty=0.0)) for _ in range(20)]
    images = render.render([grammar.realise(s, rng) for s in specs])
    prompts = [grammar.prompt_of(s) for s in specs]
    assert checker.accuracy(prompts, images) == 1.0
    assert checker.accuracy(prompts, torch.zeros_like(images)) == 0.0
    with pytest.raises(ValueError, match="20 prompts for 19 images"):
        checker.accuracy(prompts, images[:19])


# ----------------------------------------------------------------------------- checker on wrong renders
RED_CIRCLE = (SceneObject("circle", "red", "large", 16.0, 16.0),)


@pytest.mark.parametrize("prompt", ["a red circle", "a circle", "a large red circle", "a large red circle in the center",
                                    "a red circle in the center", ""])
def test_checker_accepts_what_the_image_shows(prompt):
    assert checker.check(prompt, render.render([RED_CIRCLE])[0]).ok


@pytest.mark.parametrize("prompt,reason", [
    ("a blue circle", "do not match"),
    ("a red square", "do not match"),
    ("a red triangle", "do not match"),
    ("a small red circle", "do not match"),
    ("a red circle in the top left", "do not match"),
    ("two circles", "expected 2 object(s), found 1"),
    ("three red circles", "expected 3 object(s), found 1"),
    ("a red circle and a square", "expected 2 object(s), found 1"),
])
def test_checker_rejects_a_wrong_render(prompt, reason):
    verdict = checker.check(prompt, render.render([RED_CIRCLE])[0])
    assert not verdict.ok
    assert reason in verdict.reason
    assert [(f.shape, f.colour, f.size, f.position) for f in verdict.found] == [("circle", "red", "large", "center")]


def test_blank_image_fails():
    verdict = checker.check("a circle", torch.zeros(3, 32, 32))
    assert not verdict.ok and verdict.reason == "expected 1 object(s), found 0" and verdict.found == ()


def _other(value: str, names: tuple[str, ...]) -> str:
    return names[(names.index(value) + 1) % len(names)]


@pytest.mark.parametrize("field", ["shape", "colour", "size", "position"])
def test_checker_rejects_every_changed_attribute(field):
    mix = TemplateMix(empty=0.0, single=1.0, pair=0.0, count=0.0, p_size=1.0, p_colour=1.0, p_position=1.0)
    names = {"shape": grammar.SHAPES, "colour": grammar.COLOUR_NAMES, "size": grammar.SIZE_NAMES,
             "position": grammar.POSITION_NAMES}[field]
    rng = np.random.default_rng(11)
    specs = [grammar.sample_spec(rng, mix) for _ in range(150)]
    assert all(s.fully_specified for s in specs)
    images = render.render([grammar.realise(s, rng) for s in specs])
    wrongly_accepted = []
    for spec, image in zip(specs, images):
        assert checker.check_spec(spec, image).ok
        obj = spec.objects[0]
        changed = Spec("single", (dataclasses.replace(obj, **{field: _other(getattr(obj, field), names)}),))
        if checker.check_spec(changed, image).ok:
            wrongly_accepted.append(grammar.prompt_of(changed))
    assert wrongly_accepted == []


def _ragged(image: torch.Tensor, rng: np.random.Generator, frac: float) -> torch.Tensor:
    """Knock out a fraction ``frac`` of the object's boundary pixels, as generated edges look."""
    img = image.clone()
    fg = img.max(0).values >= checker.BRIGHT
    inner = torch.zeros_like(fg)
    inner[1:-1, 1:-1] = fg[1:-1, 1:-1] & fg[:-2, 1:-1] & fg[2:, 1:-1] & fg[1:-1, :-2] & fg[1:-1, 2:]
    edge = (fg & ~inner).nonzero()
    drop = edge[torch.from_numpy(rng.random(len(edge)) < frac)]
    img[:, drop[:, 0], drop[:, 1]] = 0.0
    return img


@pytest.mark.parametrize("size", ["small", "large"])
def test_checker_reads_ragged_squares_as_squares_and_ragged_circles_as_circles(size):
    """Generated squares lose edge pixels (fill 0.8-0.9, like a circle) but keep their corners."""
    rng = np.random.default_rng(17)
    for shape in ("square", "circle"):
        fills = []
        for i in range(20):
            obj = SceneObject(shape, "red", size, float(rng.uniform(10, 22)), float(rng.uniform(10, 22)))
            img = _ragged(render.render([(obj,)])[0], rng, 0.35)
            found = checker.find_objects(img)
            assert len(found) == 1
            fills.append(found[0].fill)
            assert found[0].shape == shape, (shape, size, i, found[0])
        if shape == "square":
            assert min(fills) < 0.9  # the fill rule alone would have called these circles


def test_checker_counts_objects():
    rng = np.random.default_rng(5)
    for n in (2, 3):
        spec = Spec("count", (ObjectSpec("square", "green"),) * n)
        image = render.render([grammar.realise(spec, rng)])[0]
        assert checker.check_spec(spec, image).ok
        fewer = Spec("count", (ObjectSpec("square", "green"),) * (5 - n))
        assert not checker.check_spec(fewer, image).ok


# ----------------------------------------------------------------------------- grammar
def test_prompts_parse_back_to_their_spec():
    rng = np.random.default_rng(7)
    specs = [grammar.sample_spec(rng) for _ in range(3000)]
    mismatched = [(s, grammar.prompt_of(s)) for s in specs if grammar.parse_prompt(grammar.prompt_of(s)) != s]
    assert mismatched == []
    assert {s.template for s in specs} == {"empty", "single", "pair", "count"}
    # every prompt the grammar writes can be tokenized
    ids = grammar.tokenize([grammar.prompt_of(s) for s in specs])
    assert ids.shape == (3000, grammar.MAX_TOKENS)


@pytest.mark.parametrize("prompt,spec", [
    ("a circle", Spec("single", (ObjectSpec("circle"),))),
    ("a large red circle in the top left", Spec("single", (ObjectSpec("circle", "red", "large", "top left"),))),
    ("a red circle and a small square", Spec("pair", (ObjectSpec("circle", "red"), ObjectSpec("square", None, "small")))),
    ("three blue triangles", Spec("count", (ObjectSpec("triangle", "blue"),) * 3)),
    ("", Spec("empty", ())),
])
def test_parse_known_prompts(prompt, spec):
    assert grammar.parse_prompt(prompt) == spec
    assert grammar.prompt_of(spec) == prompt


def test_tokenize_layout():
    ids = grammar.tokenize(["a red circle", "A Red, circle", ""])
    v = {w: i for i, w in enumerate(grammar.VOCAB)}
    assert ids.dtype == np.int64 and ids.shape == (3, grammar.MAX_TOKENS)
    assert ids[0].tolist() == [v["<cls>"], v["a"], v["red"], v["circle"]] + [v["<pad>"]] * (grammar.MAX_TOKENS - 4)
    assert ids[1].tolist() == ids[0].tolist()  # case and commas do not matter
    assert ids[2].tolist() == [v["<cls>"]] + [0] * (grammar.MAX_TOKENS - 1)


@pytest.mark.parametrize("word", ["purple", "hexagon", "<pad>", "<cls>"])
def test_tokenize_rejects_unknown_words(word):
    with pytest.raises(ConfigError, match=f"word '{word}' is not in tinyflow's vocabulary"):
        grammar.tokenize(["a red circle", f"a {word} circle"])
    with pytest.raises(ConfigError, match=f"word '{word}'"):
        grammar.parse_prompt(f"a {word} circle")


def test_tokenize_rejects_too_long_prompts():
    longest = " ".join(["circle"] * (grammar.MAX_TOKENS - 1))
    assert grammar.tokenize([longest]).shape == (1, grammar.MAX_TOKENS)
    too_long = "a large red circle in the top left and a small blue square"
    with pytest.raises(ConfigError, match=r"has 13 words; tinyflow takes at most 11"):
        grammar.tokenize([too_long])


@pytest.mark.parametrize("prompt", ["circle", "a red", "two", "a circle and a square and a triangle",
                                    "a circle in the middle"])
def test_parse_rejects_prompts_outside_the_grammar(prompt):
    with pytest.raises(ConfigError, match="prompt"):
        grammar.parse_prompt(prompt)


def test_realised_objects_do_not_overlap():
    rng = np.random.default_rng(9)
    for _ in range(300):
        spec = grammar.sample_spec(rng, TemplateMix(empty=0.0, single=0.0, pair=0.5, count=0.5))
        scene = grammar.realise(spec, rng)
        assert [o.shape for o in scene] == [o.shape for o in spec.objects]
        for i, a in enumerate(scene):
            for b in scene[i + 1:]:
                gap = grammar.SIZES[a.size] + grammar.SIZES[b.size] + grammar.GAP
                assert abs(a.cx - b.cx) >= gap or abs(a.cy - b.cy) >= gap


def _pairs(layout: str, n: int = 400) -> list[tuple[grammar.SceneObject, ...]]:
    rng = np.random.default_rng(4)
    mix = TemplateMix(empty=0.0, single=0.0, pair=1.0, count=0.0)
    return [grammar.realise(grammar.sample_spec(rng, mix), rng, pair_layout=layout) for _ in range(n)]


def test_ordered_pairs_read_left_to_right_and_leave_the_rest_free():
    scenes = _pairs("ordered")
    for a, b in scenes:  # first-named object left of the second, boxes GAP apart in x
        assert a.cx + grammar.SIZES[a.size] + grammar.GAP <= b.cx - grammar.SIZES[b.size] + 1e-9
        for o in (a, b):
            h = grammar.SIZES[o.size]
            assert h <= o.cx <= grammar.IMAGE_SIZE - h and h <= o.cy <= grammar.IMAGE_SIZE - h
    # vertical positions, sizes and colours stay free: every combination occurs
    cy = np.array([[a.cy, b.cy] for a, b in scenes])
    assert (cy[:, 0] < cy[:, 1] - 8).mean() > 0.15 and (cy[:, 0] > cy[:, 1] + 8).mean() > 0.15
    assert {(a.size, b.size) for a, b in scenes} == {(x, y) for x in grammar.SIZES for y in grammar.SIZES}
    assert len({a.colour for a, _ in scenes} | {b.colour for _, b in scenes}) == len(grammar.COLOURS)


def test_free_pairs_are_placed_in_either_order():
    scenes = _pairs("free")
    left_first = np.mean([a.cx < b.cx for a, b in scenes])
    assert 0.3 < left_first < 0.7
    assert any(abs(a.cx - b.cx) < grammar.SIZES[a.size] + grammar.SIZES[b.size] for a, b in scenes)  # stacked


def test_pair_layout_is_checked():
    spec = grammar.parse_prompt("a circle and a square")
    with pytest.raises(ConfigError, match=r"pair_layout must be one of \('ordered', 'free'\) \(got 'diagonal'\)"):
        grammar.realise(spec, np.random.default_rng(0), pair_layout="diagonal")


# ----------------------------------------------------------------------------- latents
def test_image_latent_round_trip_is_exact():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    latents = image_to_latent(images)
    assert latents.shape == (4, 64, 48)
    assert torch.equal(latent_to_image(latents), images)
    z = torch.randn(4, 64, 48, generator=g)
    assert torch.equal(image_to_latent(latent_to_image(z)), z)


def test_latents_are_flux_pipeline_packing_of_the_unshuffled_image():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    packed = FluxPipeline._pack_latents(F.pixel_unshuffle(images, 2), 2, 12, 16, 16)
    assert torch.equal(image_to_latent(images), packed)
    unpacked = FluxPipeline._unpack_latents(packed, 32, 32, vae_scale_factor=2)
    assert torch.equal(F.pixel_shuffle(unpacked, 2), images)
    assert torch.equal(image_ids(), FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32))


def test_images_maps_latents_to_unit_range():
    scene_images = render.render([RED_CIRCLE])
    latents = image_to_latent(scene_images * 2 - 1)
    back = tinyflow.TinyFlow.images(latents)
    torch.testing.assert_close(back, scene_images)
    assert checker.check("a red circle", back[0]).ok


# ----------------------------------------------------------------------------- loading
def _block_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_load_works_offline_from_package_data(monkeypatch):
    _block_network(monkeypatch)
    package_dir = Path(budcache.__file__).resolve().parent
    weights = tinyflow.WEIGHTS_DIR.resolve()
    assert weights == package_dir / "tinyflow" / "weights"
    for sub in ("transformer", "text_encoder"):
        assert (weights / sub / "config.json").is_file()
        assert (weights / sub / "diffusion_pytorch_model.safetensors").is_file()

    tf = tinyflow.load()
    assert not tf.transformer.training and not tf.text_encoder.training
    assert tf.device == torch.device("cpu")
    for key, value in TRANSFORMER_CONFIG.items():
        got = tf.transformer.config[key]
        assert (tuple(got) if isinstance(got, list) else got) == value, key
    shipped = load_file(str(weights / "transformer" / "diffusion_pytorch_model.safetensors"))
    state = tf.transformer.state_dict()
    assert shipped.keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in shipped.items())

    cond = tf.encode(["a red circle", ""])
    assert cond.prompt_embeds.shape == (2, grammar.MAX_TOKENS, 64) and cond.pooled_prompt_embeds.shape == (2, 64)
    # noise is per seed, independent of the batch it is drawn in
    assert torch.equal(tf.noise([0, 1])[1], tf.noise([1])[0])
    assert tf.noise([5]).shape == (1, 64, 48)


def test_package_data_ships_the_weights():
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    # every Python that requires-python allows: 3.10 has no tomllib, so read the one table by hand
    text = pyproject.read_text()
    table = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    line = next(ln for ln in table.splitlines() if ln.split("=", 1)[0].strip() == "budcache")
    patterns = ast.literal_eval(line.split("=", 1)[1].strip())
    if sys.version_info >= (3, 11):  # the hand-read table is what a TOML parser reads
        import tomllib

        assert patterns == tomllib.loads(text)["tool"]["setuptools"]["package-data"]["budcache"]
    package_dir = Path(budcache.__file__).resolve().parent
    files = [p.relative_to(package_dir).as_posix() for p in tinyflow.WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert len(files) == 4
    for f in files:
        assert any(fnmatch.fnmatch(f, pat) for pat in patterns), f


def test_load_from_a_missing_path_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"tinyflow weights not found: .*transformer.*config\.json"):
        tinyflow.load(tmp_path)


# ----------------------------------------------------------------------------- training
def test_make_batch_is_deterministic():
    ids, params = make_batch(4, 0, 3)
    ids2, params2 = make_batch(4, 0, 3)
    assert ids.shape == (4, grammar.MAX_TOKENS) and params.shape == (4, grammar.MAX_OBJECTS, 6)
    assert torch.equal(ids, ids2) and torch.equal(params, params2)
    pair_only = TemplateMix(empty=0.0, single=0.0, pair=1.0, count=0.0)
    ordered, free = make_batch(8, 0, 3, pair_only)[1], make_batch(8, 0, 3, pair_only, "free")[1]
    assert not torch.equal(ordered, free)
    ids3, params3 = make_batch(4, 0, 4)
    ids4, params4 = make_batch(4, 1, 3)
    assert not torch.equal(params, params3) and not torch.equal(params, params4)


def test_training_mix_defaults_to_the_grammar_mix_and_keeps_ten_percent_empty():
    assert np.allclose(TrainConfig().template_mix().probs(), TemplateMix().probs())
    mix = TrainConfig(mix_single=3, mix_pair=4, mix_count=2).template_mix()
    assert np.allclose(mix.probs(), [0.1, 0.3, 0.4, 0.2])
    # a pair-only mix: every non-empty prompt of the batch has two objects
    ids, params = make_batch(200, 0, 0, TrainConfig(mix_single=0, mix_pair=1, mix_count=0).template_mix())
    words = [grammar.VOCAB[i] for i in ids.flatten().tolist()]
    n_empty = int((ids[:, 1] == 0).sum())
    assert words.count("and") == 200 - n_empty and 5 < n_empty < 40
    assert "two" not in words and "three" not in words
    # the weights shift the share of two-object prompts: 25% by default, 40% with 3:4:2
    pairs = [int((make_batch(1000, 0, 0, m)[0] == grammar.VOCAB.index("and")).sum())
             for m in (TemplateMix(), mix)]
    assert 200 < pairs[0] < 300 and 350 < pairs[1] < 450, pairs


@pytest.mark.parametrize("bad", [dict(mix_pair=-0.1), dict(mix_single=0, mix_pair=0, mix_count=0),
                                 dict(mix_count=float("nan"))])
def test_training_mix_rejects_bad_weights(tmp_path, bad):
    with pytest.raises(ConfigError, match="mix_single, mix_pair and mix_count"):
        train(tmp_path / "x", TrainConfig(iters=1, batch=2, **bad), progress=False)
    assert not (tmp_path / "x").exists()


def test_training_resumes_a_checkpoint_written_before_the_mix_fields(tmp_path):
    cfg = TrainConfig(iters=2, batch=2, warmup=1)
    out = tmp_path / "ckpt"
    _train(out, cfg, minutes=0)
    state = json.loads((out / "state.json").read_text())
    for f in ("mix_single", "mix_pair", "mix_count"):
        del state["config"][f]  # what an older checkpoint holds
    (out / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="was made with config"):
        _train(out, dataclasses.replace(cfg, mix_pair=0.5))  # the old run used the default mix
    _train(out, cfg)
    assert json.loads((out / "state.json").read_text())["step"] == 2


@pytest.mark.parametrize("field, before, default", [("text_kernel", 0, 3), ("text_lookahead", 0, 2),
                                                   ("pair_layout", "free", "ordered")])
def test_training_resumes_a_checkpoint_written_before_a_field(tmp_path, field, before, default):
    # such a run had no word convolution / look-ahead and drew pairs anywhere; the defaults changed,
    # so it resumes with the value it was made with, and a refusal names the flag and that value
    cfg = TrainConfig(iters=2, batch=2, warmup=1, **{field: before})
    out = tmp_path / "ckpt"
    _train(out, cfg, minutes=0)
    state = json.loads((out / "state.json").read_text())
    del state["config"][field]
    (out / "state.json").write_text(json.dumps(state))
    flag = "--" + field.replace("_", "-")
    message = rf"was made with config .*; to resume it pass {flag} {re.escape(repr(before))} \(not {re.escape(repr(default))}\)$"
    with pytest.raises(ConfigError, match=message):
        _train(out, dataclasses.replace(cfg, **{field: default}))
    _train(out, cfg)
    assert json.loads((out / "state.json").read_text())["step"] == 2


def _train(out: Path, cfg: TrainConfig, **kw) -> Path:
    # training needs autograd whatever grad mode earlier code in this process left behind
    with torch.enable_grad():
        return train(out, cfg, progress=False, save_every_s=0, **kw)


def _tensors(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.relative_to(root).as_posix(): load_file(str(p)) for p in sorted(root.rglob("*.safetensors"))}


def test_training_resumes_exactly(tmp_path, capsys):
    cfg = TrainConfig(iters=4, batch=4, warmup=2)
    a, b = tmp_path / "a", tmp_path / "b"
    _train(a, cfg)

    # B: stop after one step (minutes=0 ends the run after its first step), then at step 3, then finish
    _train(b, cfg, minutes=0)
    assert json.loads((b / "state.json").read_text())["step"] == 1
    _train(b, cfg, stop_at=3)
    assert json.loads((b / "state.json").read_text())["step"] == 3
    _train(b, cfg, stop_at=3)  # already there: nothing to do
    assert json.loads((b / "state.json").read_text())["step"] == 3
    _train(b, cfg)
    assert "resumed from" in capsys.readouterr().out

    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert {"transformer/diffusion_pytorch_model.safetensors", "transformer_ema/diffusion_pytorch_model.safetensors",
            "text_encoder/diffusion_pytorch_model.safetensors", "optim_exp_avg.safetensors"} <= ta.keys()
    for name in ta:
        assert ta[name].keys() == tb[name].keys(), name
        for key in ta[name]:
            assert torch.equal(ta[name][key], tb[name][key]), (name, key)
    sa, sb = (json.loads((d / "state.json").read_text()) for d in (a, b))
    assert sa["step"] == sb["step"] == 4
    assert sa["config"] == sb["config"] == dataclasses.asdict(cfg)
    assert sa["optim"] == sb["optim"]

    # the checkpoint holds only safetensors and JSON files, and no temporary leftovers
    for d in (a, b):
        files = [p for p in d.rglob("*") if p.is_file()]
        assert files and all(p.suffix in (".safetensors", ".json") for p in files), files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]

    # training changed the weights
    torch.manual_seed(0)
    init = new_transformer().state_dict()
    assert any(not torch.equal(init[k], v) for k, v in ta["transformer/diffusion_pytorch_model.safetensors"].items())

    # a finished run is not trained further; another config is refused
    before = (a / "state.json").read_text()
    _train(a, cfg)
    assert (a / "state.json").read_text() == before
    with pytest.raises(ConfigError, match="was made with config"):
        _train(a, dataclasses.replace(cfg, batch=8))

    # the exported EMA weights load as tinyflow
    export_weights(a, tmp_path / "export")
    tf = tinyflow.load(tmp_path / "export")
    ema = ta["transformer_ema/diffusion_pytorch_model.safetensors"]
    assert all(torch.equal(tf.transformer.state_dict()[k], v) for k, v in ema.items())


def test_training_starts_from_exported_weights(tmp_path):
    # lr 0: one step leaves the weights where --init put them, so the checkpoint holds the shipped weights
    enc = json.loads((tinyflow.WEIGHTS_DIR / "text_encoder" / "config.json").read_text())
    cfg = TrainConfig(iters=1, batch=2, warmup=1, lr=0.0, init=str(tinyflow.WEIGHTS_DIR),
                      text_kernel=enc.get("local_kernel", 0), text_lookahead=enc.get("lookahead", 0))
    out = _train(tmp_path / "ckpt", cfg)
    for sub in ("transformer", "text_encoder"):
        shipped = load_file(str(tinyflow.WEIGHTS_DIR / sub / "diffusion_pytorch_model.safetensors"))
        for name in (sub, f"{sub}_ema"):
            got = load_file(str(out / name / "diffusion_pytorch_model.safetensors"))
            assert got.keys() == shipped.keys()
            assert all(torch.equal(got[k], v) for k, v in shipped.items()), name
    # a resumed run takes its weights from the checkpoint, whatever --init now says
    longer = dataclasses.replace(cfg, iters=2, init=str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="was made with config"):
        _train(out, longer)  # iters differ: still refused
    _train(out, dataclasses.replace(cfg, init=str(tmp_path / "elsewhere")))  # finished: nothing to do, no error


def _checker_accuracy(tf, n: int, steps: int) -> float:
    """The checker accuracy ``monitor`` reports, recomputed with budcache's sampler on the same pairs and schedule."""
    from budcache.tinyflow import checker, grammar
    from budcache.tinyflow.train import TRAIN_SHIFT

    pairs = grammar.heldout_pairs(n)
    sig = torch.linspace(1.0, 1.0 / steps, steps)
    sig = torch.cat([TRAIN_SHIFT * sig / (1 + (TRAIN_SHIFT - 1) * sig), torch.zeros(1)])
    lat = tf.sample([p for p, _ in pairs], [s for _, s in pairs], steps=steps, sigmas=sig, guidance=1.0).latent
    return sum(checker.check(p, im).ok for (p, _), im in zip(pairs, tf.images(lat))) / n


def test_training_a_deeper_text_encoder_next_to_the_shipped_transformer(tmp_path):
    # lr 0: the transformer stays what --init loaded; the 3-layer encoder is new, and loads back as tinyflow
    cfg = TrainConfig(iters=1, batch=2, warmup=1, lr=0.0, init=str(tinyflow.WEIGHTS_DIR), text_layers=3,
                      init_parts="transformer")
    out = _train(tmp_path / "ckpt", cfg)
    shipped = load_file(str(tinyflow.WEIGHTS_DIR / "transformer" / "diffusion_pytorch_model.safetensors"))
    got = load_file(str(out / "transformer_ema" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in shipped.items())
    export_weights(out, tmp_path / "w")
    tf = tinyflow.load(tmp_path / "w")
    assert len(tf.text_encoder.encoder.layers) == 3
    assert tf.sample(["a red circle"], seeds=[0], steps=2).latent.isfinite().all()
    res = monitor(out, n=2, steps=2)  # --eval reads the encoder's depth from the checkpoint
    assert res["accuracy"] == _checker_accuracy(tf, n=2, steps=2)  # the 3-layer encoder's images, not another's
    # the shipped 2-layer encoder does not fit a 3-layer one: loading everything is refused
    with pytest.raises(ConfigError, match="text_encoder weights do not fit"):
        _train(tmp_path / "ckpt2", dataclasses.replace(cfg, init_parts="all"))


def test_text_encoder_word_convolution_is_causal_and_starts_at_zero():
    torch.manual_seed(0)
    plain = TinyTextEncoder()
    torch.manual_seed(0)
    conv = TinyTextEncoder(local_kernel=3)  # same seed: the same init as without the convolution
    ids = torch.from_numpy(grammar.tokenize(["a red circle and a blue square", "two green triangles"]))
    # zero-initialised: the encoder with the convolution is the encoder without it
    for a, b in zip(plain(ids), conv(ids)):
        assert torch.equal(a, b)
    # once trained (random weights here), word t sees words t-2..t and nothing after them
    torch.nn.init.normal_(conv.local.weight)
    base = conv.embed_words(ids)
    for t in range(1, ids.shape[1]):
        other = ids.clone()
        other[:, t] = (other[:, t] % (len(grammar.VOCAB) - 2)) + 2  # another real word
        changed = (conv.embed_words(other) - base).abs().amax(dim=(0, 2)) > 0
        expect = torch.zeros(ids.shape[1], dtype=torch.bool)
        expect[t:t + 3] = True
        assert torch.equal(changed, expect), t
    with pytest.raises(ValueError, match="local_kernel must be >= 0"):
        TinyTextEncoder(local_kernel=-1)


def test_text_encoder_lookahead_sees_the_words_after_and_starts_at_zero():
    torch.manual_seed(0)
    causal = TinyTextEncoder(local_kernel=3)
    torch.manual_seed(0)
    both = TinyTextEncoder(local_kernel=3, lookahead=2)  # same seed: the same init as without it
    ids = torch.from_numpy(grammar.tokenize(["a red circle and a blue square", "two green triangles"]))
    for a, b in zip(causal(ids), both(ids)):
        assert torch.equal(a, b)
    # once trained (random weights here): word t reaches words t-2..t+2, and the look-ahead alone t-2..t
    torch.nn.init.normal_(both.ahead.weight)
    for local in (False, True):
        if local:
            torch.nn.init.normal_(both.local.weight)
        base = both.embed_words(ids)
        for t in range(1, ids.shape[1]):
            other = ids.clone()
            other[:, t] = (other[:, t] % (len(grammar.VOCAB) - 2)) + 2
            changed = (both.embed_words(other) - base).abs().amax(dim=(0, 2)) > 0
            expect = torch.zeros(ids.shape[1], dtype=torch.bool)
            expect[max(0, t - 2):(t + 3 if local else t + 1)] = True
            assert torch.equal(changed, expect), (local, t)
    # an adjective's state now depends on its shape: "blue" differs in "a blue square" and "a blue circle"
    sq, ci = both(torch.from_numpy(grammar.tokenize(["a blue square", "a blue circle"])))[0][:, 2]
    assert not torch.allclose(sq, ci)
    with pytest.raises(ValueError, match="lookahead must be >= 0"):
        TinyTextEncoder(lookahead=-1)


def _weights_without_word_convolution(dest: Path) -> Path:
    """The shipped weights with the text encoder's word convolutions removed (an encoder made before them)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(tinyflow.WEIGHTS_DIR, dest)
    f = dest / "text_encoder" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if not k.startswith(("local.", "ahead."))}, str(f))
    config = json.loads((dest / "text_encoder" / "config.json").read_text())
    (dest / "text_encoder" / "config.json").write_text(json.dumps({**config, "local_kernel": 0, "lookahead": 0}))
    return dest


def test_training_adds_a_word_convolution_to_an_encoder_without_one(tmp_path):
    # lr 0: the kernel the initial encoder lacks starts at zero and everything else is as loaded,
    # so the exported weights sample exactly what the initial ones do
    init = _weights_without_word_convolution(tmp_path / "init")
    cfg = TrainConfig(iters=1, batch=2, warmup=1, lr=0.0, init=str(init), text_kernel=3, text_lookahead=2)
    out = _train(tmp_path / "ckpt", cfg)
    before = load_file(str(init / "text_encoder" / "diffusion_pytorch_model.safetensors"))
    got = load_file(str(out / "text_encoder_ema" / "diffusion_pytorch_model.safetensors"))
    assert set(got) - set(before) == {"local.weight", "local.bias", "ahead.weight"}
    assert all(torch.equal(got[k], v) for k, v in before.items())
    assert not got["local.weight"].any() and got["local.weight"].shape == (64, 64, 3)
    assert not got["ahead.weight"].any() and got["ahead.weight"].shape == (64, 64, 2)
    export_weights(out, tmp_path / "w")
    tf = tinyflow.load(tmp_path / "w")
    assert tf.text_encoder.config.local_kernel == 3 and tf.text_encoder.config.lookahead == 2
    a = tf.sample(["a red circle and a square"], seeds=[0], steps=2).latent
    b = tinyflow.load(init).sample(["a red circle and a square"], seeds=[0], steps=2).latent
    assert torch.equal(a, b)
    # --eval builds the encoder from its config: its verdicts are those of the exported model's own images
    assert monitor(out, n=2, steps=2)["accuracy"] == _checker_accuracy(tf, n=2, steps=2)
    # the other way round, a learned convolution is never dropped: an encoder without one refuses it
    for other in (0, 5):
        with pytest.raises(ConfigError, match=f"word convolution of width 3, this run's has "
                                              f"{other or 'none'}; pass --text-kernel 3"):
            _train(tmp_path / f"c{other}", dataclasses.replace(cfg, init=str(tmp_path / "w"), text_kernel=other))
    for other in (0, 1):
        with pytest.raises(ConfigError, match=f"look-ahead convolution of width 2, this run's has "
                                              f"{other or 'none'}; pass --text-lookahead 2"):
            _train(tmp_path / f"a{other}", dataclasses.replace(cfg, init=str(tmp_path / "w"), text_lookahead=other))


@pytest.mark.parametrize("bad, message", [(dict(text_layers=0), "text_layers must be >= 1"),
                                          (dict(init_parts="encoder"), "init_parts must be 'all' or 'transformer'"),
                                          (dict(text_kernel=-1), "text_kernel must be >= 0"),
                                          (dict(text_lookahead=-1), "text_lookahead must be >= 0"),
                                          (dict(pair_layout="grid"), "pair_layout must be one of")])
def test_training_rejects_bad_text_encoder_settings(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        train(tmp_path / "x", TrainConfig(iters=1, batch=2, **bad), progress=False)


def test_training_init_from_a_directory_without_weights_names_the_file(tmp_path):
    (tmp_path / "w" / "transformer").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"--init .*transformer/diffusion_pytorch_model\.safetensors"):
        _train(tmp_path / "ckpt", TrainConfig(iters=1, batch=2, init=str(tmp_path / "w")))
    assert not (tmp_path / "ckpt").exists()


def test_training_init_with_weights_of_another_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file

    for sub in ("transformer", "text_encoder"):
        (tmp_path / "w" / sub).mkdir(parents=True)
        save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "w" / sub / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConfigError, match="do not fit tinyflow's architecture"):
        _train(tmp_path / "ckpt", TrainConfig(iters=1, batch=2, init=str(tmp_path / "w")))


def test_train_rejects_a_stop_before_the_first_step(tmp_path):
    with pytest.raises(ConfigError, match=r"stop_at must be >= 1 \(got 0\)"):
        train(tmp_path / "x", TrainConfig(iters=2, batch=2), progress=False, stop_at=0)
    assert not (tmp_path / "x").exists()


def test_train_rejects_empty_runs(tmp_path):
    with pytest.raises(ConfigError, match="batch and iters must be >= 1"):
        train(tmp_path / "x", TrainConfig(iters=0, batch=4), progress=False)


def test_training_refuses_to_overwrite_a_directory_that_is_not_a_checkpoint(tmp_path):
    from budcache.errors import ConfigError
    from budcache.tinyflow.train import TrainConfig, train

    (tmp_path / "report.md").write_text("precious")
    with pytest.raises(ConfigError, match="not a tinyflow checkpoint"):
        train(tmp_path, TrainConfig(iters=1, batch=2), progress=False)
    assert (tmp_path / "report.md").read_text() == "precious"


def test_a_pipeline_is_not_taken_for_a_denoiser():
    from budcache import sample
    from budcache.errors import ConfigError

    tf = tinyflow.load()
    with pytest.raises(ConfigError, match="pipe.transformer"):
        sample(tf.pipeline(), tf.noise([0]), tf.encode(["a circle"]), tf.sigmas(4))
