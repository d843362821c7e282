"""A user's mistake through the real ``budcache`` process: one ``budcache <cmd>: error:`` line, a documented
exit code (2 bad input, 3 a refused write, 130 Ctrl-C, 141 broken pipe) and never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import budcache
from budcache import CachePolicy
from budcache.cli import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_IO, EXIT_USAGE, main

SRC = str(Path(budcache.__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}
RUN = [sys.executable, "-m", "budcache.cli"]


def budcache_cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


def assert_error(proc: subprocess.CompletedProcess, command: str, code: int, *words: str) -> str:
    """The exit code, no traceback, and a last stderr line ``budcache <command>: error: ...`` holding ``words``."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines, "no message"
    assert lines[-1].startswith(f"budcache {command}: error: "), proc.stderr[-3000:]
    for w in words:
        assert w in lines[-1], lines[-1]
    return lines[-1]


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, code: int, *words: str) -> str:
    """As :func:`assert_error`, and the message is all of stderr (no usage text, no warnings)."""
    line = assert_error(proc, command, code, *words)
    assert proc.stderr.strip() == line, proc.stderr[-3000:]
    return line


@pytest.fixture()
def policy_file(tmp_path):
    p = tmp_path / "p.json"
    CachePolicy.uniform(8, 3).with_meta(model="tinyflow").save(p)
    return p


# ---------------------------------------------------------------- --out problems, before any work
@pytest.fixture(params=["existing file", "under a file", "read-only place", "under /proc"])
def bad_out_dir(request, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    if request.param == "existing file":
        return str(f), "not a directory"
    if request.param == "under a file":
        return str(f / "run"), "Not a directory"
    if request.param == "read-only place":
        if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses it
            return "/sys/budcache-run", "cannot write there"
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        return str(ro / "run"), "cannot write there"
    return "/proc/budcache-run", "cannot write there"


@pytest.mark.parametrize("command", ["search", "align"])
def test_out_dir_that_cannot_be_written_is_refused_up_front(command, bad_out_dir):
    out, why = bad_out_dir
    extra = ["--uniform", "2", "--steps", "4"] if command == "align" else ["--steps", "4", "--nfe", "2"]
    proc = budcache_cli(command, *extra, "--out", out)
    assert_one_line_error(proc, command, EXIT_USAGE, "--out", out, why)


def test_sample_out_is_checked_before_the_model_is_loaded(tmp_path):
    # the weights folder does not exist either: the --out error must come first (before minutes of sampling)
    proc = budcache_cli("sample", "a circle", "--model", tmp_path / "nowhere", "--out", "/sys/budcache.png")
    assert_one_line_error(proc, "sample", EXIT_USAGE, "--out /sys/budcache.png", "cannot write there")
    proc = budcache_cli("sample", "a circle", "--out", tmp_path)
    assert_one_line_error(proc, "sample", EXIT_USAGE, "--out", "is a directory")


def test_show_plot_to_an_unwritable_path(policy_file, tmp_path):
    (tmp_path / "f").write_text("x")
    proc = budcache_cli("show", policy_file, "--plot", tmp_path / "f" / "mask.png")
    assert_one_line_error(proc, "show", EXIT_USAGE, "--plot", "is not a directory")
    assert proc.stdout == ""  # refused before printing half a report


# ---------------------------------------------------------------- faults while running
def test_disk_full_names_the_file_and_exits_3(policy_file, tmp_path):
    code = ("import errno, os, sys\n"
            "def full(fd): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "os.fsync = full\n"
            "from budcache.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    plot = tmp_path / "mask.png"
    plot.write_bytes(b"earlier")
    proc = subprocess.run([sys.executable, "-c", code, "show", str(policy_file), "--plot", str(plot)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert_one_line_error(proc, "show", EXIT_IO, str(plot), "No space left on device")
    assert plot.read_bytes() == b"earlier"  # the earlier file is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_broken_pipe_exits_quietly(policy_file):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before budcache writes: `budcache show P | true`
    try:
        proc = subprocess.run([*RUN, "show", str(policy_file)], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env=ENV, timeout=300)
    finally:
        os.close(write_end)
    assert proc.returncode == EXIT_BROKEN_PIPE
    assert proc.stderr == ""


def _start_search(out: Path, *extra: str) -> subprocess.Popen:
    args = ["search", "--steps", "8", "--nfe", "3", "--calib-pairs", "2", "--heldout", "2", "--sa-iters", "100000",
            "--quiet", "--out", str(out), *extra]
    return subprocess.Popen([*RUN, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the search ended early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)


def test_ctrl_c_during_search_prints_one_line_with_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = _start_search(out)
    try:
        _wait_for(out / "checkpoint_N8_K3.json", proc)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines() == [f"budcache search: interrupted; the checkpoints in {out} are kept: run the "
                                        "same command with --resume to continue"]
    ckpt = json.loads((out / "checkpoint_N8_K3.json").read_text())
    assert ckpt["state"]["phase"] == "sa" and ckpt["sha256"]


def test_ctrl_c_during_align_prints_one_line_with_how_to_resume(tmp_path):
    out = tmp_path / "align"
    args = ["align", "--uniform", "2", "--steps", "4", "--calib-pairs", "2", "--heldout", "1", "--accumulation", "1",
            "--epochs", "10000", "--quiet", "--out", str(out)]
    proc = subprocess.Popen([*RUN, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "checkpoint_N4_K2.safetensors", proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert err.strip().splitlines() == [f"budcache align: interrupted; the checkpoints in {out} are kept: run the "
                                        "same command with --resume to continue"]
    again = budcache_cli(*args)  # without --resume: refused, the checkpoint kept
    assert_one_line_error(again, "align", EXIT_USAGE, "checkpoint_N4_K2.safetensors", "--resume", "--force")


def test_a_killed_searchs_checkpoint_survives_a_second_run_without_resume(tmp_path):
    out = tmp_path / "run"
    proc = _start_search(out)
    try:
        _wait_for(out / "checkpoint_N8_K3.json", proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    before = (out / "checkpoint_N8_K3.json").read_bytes()
    again = budcache_cli("search", "--steps", "8", "--nfe", "3", "--calib-pairs", "2", "--heldout", "2",
                         "--sa-iters", "100000", "--quiet", "--out", out)
    assert_one_line_error(again, "search", EXIT_USAGE, "checkpoint_N8_K3.json", "--resume", "--force")
    assert (out / "checkpoint_N8_K3.json").read_bytes() == before


# ---------------------------------------------------------------- bad values
@pytest.mark.parametrize("args, words", [
    (["search", "--steps", "-5"], ["--steps", "-5"]),
    (["search", "--seeds-per-prompt", "0"], ["--seeds-per-prompt", "0"]),
    (["sample", "--nfe", "0"], ["--nfe 0", "1..28"]),
    (["sample", "--nfe", "3", "--steps", "0"], ["--steps"]),
    (["align", "--uniform", "2", "--steps", "4", "--seeds-per-prompt", "0"], ["--seeds-per-prompt"]),
])
def test_out_of_range_numbers_name_their_option(tmp_path, args, words):
    proc = budcache_cli(*args, "--out", tmp_path / ("o.png" if args[0] == "sample" else "o"))
    line = assert_one_line_error(proc, args[0], EXIT_USAGE, *words)
    assert "--nfe" not in line or "--nfe" in words[0]  # --steps -5 used to blame --nfe


@pytest.mark.parametrize("args, words", [
    (["sample", "--seed", "99999999999999999999"], ["--seed", "out of range"]),
    (["search", "--seed", "-1"], ["--seed", "out of range"]),
    (["sample", "--guidance", "-1"], ["--guidance", "out of range"]),
    (["search", "--guidance", "nan"], ["--guidance", "out of range"]),
    (["align", "--uniform", "2", "--guidance", "-0.5"], ["--guidance", "out of range"]),
])
def test_usage_errors_of_the_parser(args, words):
    assert_error(budcache_cli(*args), args[0], EXIT_USAGE, *words)


@pytest.mark.parametrize("content", ["a red circle\n".encode("utf-16"), bytes(range(256))])
def test_sample_with_a_prompts_file_that_is_not_utf8(tmp_path, content):
    f = tmp_path / "prompts.txt"
    f.write_bytes(content)
    proc = budcache_cli("sample", f, "--out", tmp_path / "g.png")
    assert_one_line_error(proc, "sample", EXIT_USAGE, str(f), "not UTF-8")


@pytest.mark.parametrize("guidance", ["high", [1.0], True, -2.0])
def test_sample_with_a_policy_whose_meta_guidance_has_the_wrong_type(tmp_path, guidance):
    pol = tmp_path / "p.json"
    CachePolicy.uniform(6, 3).with_meta(guidance=guidance).save(pol)
    proc = budcache_cli("sample", "a circle", "--policy", pol, "--out", tmp_path / "g.png")
    assert_one_line_error(proc, "sample", EXIT_USAGE, str(pol), "meta.guidance", "a number >= 0")


def test_policy_sigmas_out_of_float32_range_are_refused(tmp_path):
    pol = tmp_path / "p.json"
    doc = CachePolicy.uniform(4, 2).to_dict()
    doc["sigmas"] = [1e300, 1.0, 0.5, 0.25, 0.0]
    pol.write_text(json.dumps(doc))
    proc = budcache_cli("show", pol)
    assert_one_line_error(proc, "show", EXIT_USAGE, "sigmas", "index 0", "out of range")


def test_a_broken_weights_folder_is_one_error_naming_it(tmp_path):
    weights = Path(budcache.__file__).parent / "tinyflow" / "weights"
    for sub in ("transformer", "text_encoder"):
        (tmp_path / "w" / sub).mkdir(parents=True)
        (tmp_path / "w" / sub / "config.json").write_bytes((weights / sub / "config.json").read_bytes())
        blob = (weights / sub / "diffusion_pytorch_model.safetensors").read_bytes()
        (tmp_path / "w" / sub / "diffusion_pytorch_model.safetensors").write_bytes(blob[:1000])  # truncated
    proc = budcache_cli("sample", "a circle", "--model", tmp_path / "w", "--out", tmp_path / "g.png")
    assert_one_line_error(proc, "sample", EXIT_USAGE, str(tmp_path / "w" / "transformer"), "cannot load")
    (tmp_path / "w" / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "w" / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    proc = budcache_cli("search", "--model", tmp_path / "w", "--out", tmp_path / "o")
    assert_one_line_error(proc, "search", EXIT_USAGE, str(tmp_path / "w" / "transformer"), "no .safetensors")


def test_align_resume_when_the_checkpoint_path_is_a_directory(tmp_path):
    out = tmp_path / "a"
    (out / "checkpoint_N4_K2.safetensors").mkdir(parents=True)
    proc = budcache_cli("align", "--uniform", "2", "--steps", "4", "--calib-pairs", "2", "--heldout", "1",
                        "--accumulation", "1", "--quiet", "--resume", "--out", out)
    assert_one_line_error(proc, "align", EXIT_USAGE, "checkpoint_N4_K2.safetensors", "is a directory")


# ---------------------------------------------------------------- show: what is printed from a file
def test_show_escapes_control_characters_from_the_file(tmp_path):
    pol = tmp_path / "p.json"
    CachePolicy.uniform(8, 3).with_meta(note="\x1b[2J\x1b[Hall clear\rfake line\nnext").save(pol)
    proc = budcache_cli("show", pol)
    assert proc.returncode == 0
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout
    assert "meta.note    \\x1b[2J\\x1b[Hall clear\\x0dfake line\\x0anext" in proc.stdout


def test_show_prints_the_learned_sigmas(tmp_path):
    pol = tmp_path / "p.json"
    CachePolicy.uniform(4, 2).with_sigmas([1.0, 0.75, 0.5, 0.2, 0.0]).save(pol)
    proc = budcache_cli("show", pol)
    assert proc.returncode == 0
    assert "sigmas      1.0000 0.7500 0.5000 0.2000 0.0000" in proc.stdout.splitlines()


def test_help_and_show_import_no_model_stack(policy_file):
    code = ("import sys\n"
            "from budcache.cli import main\n"
            "try:\n"
            "    main(sys.argv[1:])\n"
            "except SystemExit:\n"
            "    pass\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    for args in (["--help"], ["show", str(policy_file)]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "HEAVY []" in proc.stdout, (args, proc.stdout[-500:])
    top = budcache_cli("--help")
    for name in ("sample", "search", "align", "compare", "show", "train-tinyflow"):
        assert name in top.stdout


def test_every_sub_command_still_parses_its_own_options():
    from budcache.cli import COMMANDS, build_parser

    ap = build_parser()  # all sub-commands with their options
    assert ap.parse_args(["search", "--nfe", "6,8", "--force"]).force is True
    assert ap.parse_args(["align", "--uniform", "3", "--force"]).force is True
    assert set(COMMANDS) == {"sample", "search", "align", "compare", "show", "train-tinyflow"}


# ---------------------------------------------------------------- in process (API and main)
def test_align_refuses_to_overwrite_an_earlier_runs_checkpoint(tmp_path, capsys):
    out = tmp_path / "a"
    out.mkdir()
    (out / "checkpoint_N4_K2.safetensors").write_bytes(b"hours of work")
    assert main(["align", "--uniform", "2", "--steps", "4", "--out", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "checkpoint_N4_K2.safetensors" in err and "--resume" in err and "--force" in err
    assert (out / "checkpoint_N4_K2.safetensors").read_bytes() == b"hours of work"
    (out / "joint_K2_round0_search.json").write_text("{}")
    assert main(["align", "--joint", "2", "--steps", "4", "--out", str(out)]) == EXIT_USAGE
    assert "joint_K2_round0_search.json" in capsys.readouterr().err


def test_search_api_refuses_then_resumes_or_forces(tmp_path):
    from budcache.errors import ConfigError
    from budcache.problems import SamplerSettings
    from budcache.search.job import run_search

    kw = dict(nfes=[2], settings=SamplerSettings(steps=4, mechanism="vtaylor1"), calib_pairs=2, heldout_pairs=1,
              sa_iters=2, hc_rounds=1, progress=False)
    first = run_search(tmp_path, **kw)
    with pytest.raises(ConfigError, match=r"holds the checkpoint of an earlier run \(checkpoint_N4_K2\.json, "
                                         r"estimators_N4_K2_vtaylor1\.json\)"):
        run_search(tmp_path, **kw)
    assert run_search(tmp_path, resume=True, **kw)[0].policy.compute == first[0].policy.compute
    assert run_search(tmp_path, force=True, **kw)[0].policy.compute == first[0].policy.compute


def test_apply_with_a_policy_of_the_wrong_type_is_a_clear_error():
    import budcache.diffusers as bd
    from budcache.errors import ConfigError
    from helpers import make_transformer

    with pytest.raises(ConfigError, match=r"policy must be a CachePolicy, a path .* got int"):
        bd.apply(make_transformer(), 42, scheduler=object())


@pytest.mark.parametrize("option, value, words", [
    ("--seed", "99999999999999999999", "out of range"),
    ("--seed", "-1", "out of range"),
    ("--guidance", "-2", "out of range"),
    ("--guidance", "nan", "out of range"),
])
def test_compare_range_checks_name_the_option(option, value, words, capsys):
    from budcache.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["compare", "--nfe", "4", "--steps", "8", option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert option in err and words in err and "Traceback" not in err
