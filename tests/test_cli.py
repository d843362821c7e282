"""The budcache command: sample, show, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from budcache import CachePolicy
from budcache.cli import main


def test_sample_writes_grid_and_reports_exact_nfe(tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["sample", "a red circle", "two squares", "--steps", "8", "--nfe", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["nfe"] == 3 and summary["steps"] == 8 and summary["images"] == 2
    img = Image.open(out)
    # two 32-px images in one row, a 1-px border around each, scaled 4x: (2 * 33 + 1) x (33 + 1) x 4
    assert img.size == ((2 * 33 + 1) * 4, (33 + 1) * 4) and img.mode == "RGB"


def test_sample_reads_prompt_file_and_policy(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a circle\n\nthree triangles\n")
    pol = tmp_path / "p.json"
    CachePolicy.uniform(6, 2).save(pol)
    rc = main(["sample", str(prompts), "--policy", str(pol), "--out", str(tmp_path / "g.png"), "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 2 and summary["steps"] == 6 and summary["nfe"] == 2


def test_sample_policy_step_mismatch_is_a_clear_error(tmp_path, capsys):
    pol = tmp_path / "p.json"
    CachePolicy.uniform(28, 10).save(pol)
    rc = main(["sample", "a circle", "--policy", str(pol), "--steps", "20", "--out", str(tmp_path / "g.png")])
    assert rc == 2
    assert "28 steps" in capsys.readouterr().err


def test_sample_unknown_word_is_a_clear_error(tmp_path, capsys):
    rc = main(["sample", "a purple circle", "--steps", "4", "--out", str(tmp_path / "g.png"), "--quiet"])
    assert rc == 2
    assert "purple" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_show_prints_strip_and_plots(tmp_path, capsys):
    pol = tmp_path / "p.json"
    CachePolicy.uniform(12, 4).with_meta(model="tinyflow").save(pol)
    png = tmp_path / "mask.png"
    assert main(["show", str(pol), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "C..C..C..C.." in text and "3.00x" in text and "tinyflow" in text
    assert Image.open(png).size[0] > 100


@pytest.mark.parametrize("content, why", [
    (b"", "empty, expected a JSON document"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object with keys"),
    (b'{"format": "other"}', "missing key(s)"),
    (b'{"format": "other", "version": 1, "steps": 4, "compute": [0], "sigmas": null, "meta": {}}',
     "policy field 'format': expected 'budcache.policy', got 'other'"),
])
def test_show_rejects_broken_policy_files(tmp_path, capsys, content, why):
    pol = tmp_path / "bad.json"
    pol.write_bytes(content)
    assert main(["show", str(pol)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("budcache show: error: ") and str(pol) in captured.err and why in captured.err
    assert captured.out == ""


def test_sample_runs_a_policy_with_the_settings_it_was_searched_with(tmp_path, capsys):
    pol = tmp_path / "p.json"
    CachePolicy.uniform(6, 3).with_meta(solver="dpmpp2m", mechanism="forecast1", guidance=2.0).save(pol)
    assert main(["sample", "a circle", "--policy", str(pol), "--out", str(tmp_path / "g.png"), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["solver"] == "dpmpp2m" and summary["guidance"] == 2.0
    assert main(["sample", "a circle", "--policy", str(pol), "--solver", "euler", "--out", str(tmp_path / "g.png"),
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["solver"] == "euler"


def test_sample_rejects_zero_images_per_prompt(tmp_path, capsys):
    assert main(["sample", "a circle", "--per-prompt", "0", "--out", str(tmp_path / "g.png")]) == 2
    assert "--per-prompt" in capsys.readouterr().err


def test_train_tinyflow_takes_its_options_and_resumes(tmp_path, capsys):
    import torch

    from budcache import tinyflow

    out = tmp_path / "ckpt"
    args = ["train-tinyflow", "--out", str(out), "--iters", "1", "--batch", "2", "--warmup", "1",
            "--device", "cpu", "--mix-pair", "0.4", "--init", str(tinyflow.WEIGHTS_DIR),
            "--export", str(tmp_path / "w")]
    with torch.enable_grad():
        assert main(args) == 0
    state = json.loads((out / "state.json").read_text())
    assert state["step"] == 1 and state["config"]["batch"] == 2 and state["config"]["init"] == str(tinyflow.WEIGHTS_DIR)
    assert state["config"]["mix_pair"] == 0.4 and state["config"]["mix_single"] == 0.45
    assert tinyflow.load(tmp_path / "w").transformer is not None
    with torch.enable_grad():
        assert main(args[:-4] + ["--iters", "2"]) == 2  # another config: refused with a clear error
    assert "was made with config" in capsys.readouterr().err


def test_train_tinyflow_bad_mix_is_a_clear_error(tmp_path, capsys):
    assert main(["train-tinyflow", "--out", str(tmp_path / "c"), "--iters", "1", "--batch", "2",
                 "--device", "cpu", "--mix-count", "-1"]) == 2
    assert "mix_single, mix_pair and mix_count" in capsys.readouterr().err


def test_train_tinyflow_bad_init_is_a_clear_error(tmp_path, capsys):
    assert main(["train-tinyflow", "--out", str(tmp_path / "c"), "--iters", "1", "--batch", "2",
                 "--device", "cpu", "--init", str(tmp_path / "nothing")]) == 2
    assert "--init" in capsys.readouterr().err


def test_sample_compile_runs_the_pipeline_path_and_matches_the_sampler(tmp_path, capsys):
    """--compile samples through FluxPipeline + budcache.diffusers under torch.compile(fullgraph=True); the
    latents equal the sampler's for the same policy, estimator and noise (backend eager: dynamo's capture
    without inductor's C++ build, which the slow compile test covers)."""
    import torch

    from budcache import tinyflow

    rc = main(["sample", "a red circle", "two squares", "--steps", "8", "--nfe", "3", "--out",
               str(tmp_path / "g.png"), "--quiet", "--compile=eager"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["nfe"] == 3 and summary["images"] == 2
    tf = tinyflow.load()
    policy = CachePolicy.uniform(8, 3, estimator="vtaylor1")
    with torch.no_grad():
        ours = tf.sample(["a circle", "two squares"], [4, 5], 8, policy=policy).latent
        piped = tf.pipeline_sample(["a circle", "two squares"], [4, 5], 8, policy=policy, compile="eager")
    assert torch.allclose(piped, ours, atol=1e-4, rtol=1e-4), float((piped - ours).abs().max())
    assert tinyflow.load().transformer.__class__ is type(tf.transformer)  # the shared transformer is unhooked
    from budcache.hooks import find_cache

    assert find_cache(tf.transformer) is None


@pytest.mark.parametrize("extra, message", [(["--compile=nonsense"], "no such torch.compile backend"),
                                            (["--compile", "--solver", "dpmpp2m"], "scheduler is Euler")])
def test_sample_compile_bad_options_are_one_line_errors(tmp_path, capsys, extra, message):
    rc = main(["sample", "a circle", "--steps", "4", "--nfe", "2", "--out", str(tmp_path / "g.png"), *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
