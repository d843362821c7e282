"""Tests for budcache.schedules."""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from budcache.errors import ConfigError
from budcache.schedules import (
    SCHEDULES,
    flux,
    flux_mu,
    get_schedule,
    linear,
    validate_sigmas,
    wan,
)


def _pipeline_calculate_shift() -> Callable[..., float]:
    """FluxPipeline's own ``calculate_shift``, compiled from its source file.

    Importing ``pipeline_flux`` pulls in transformers (seconds); the function itself is pure.
    """
    import importlib.util

    spec = importlib.util.find_spec("diffusers")
    assert spec is not None and spec.submodule_search_locations
    path = Path(list(spec.submodule_search_locations)[0]) / "pipelines" / "flux" / "pipeline_flux.py"
    tree = ast.parse(path.read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_shift"]
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    fn: Callable[..., float] = namespace["calculate_shift"]
    return fn


def _flux_scheduler() -> object:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_linear(n: int) -> None:
    s = linear(n)
    assert s.dtype == torch.float32 and s.shape == (n + 1,)
    expected = torch.tensor([1.0 - k / n for k in range(n + 1)], dtype=torch.float32)
    torch.testing.assert_close(s, expected, atol=1e-7, rtol=0)
    assert s[0] == 1.0 and s[-1] == 0.0
    validate_sigmas(s, n, end_at_zero=True)


@pytest.mark.parametrize("n", [1, 2, 4, 28, 50])
@pytest.mark.parametrize("image_seq_len", [64, 256, 1024, 777, 4096, 8192])
def test_flux_matches_diffusers(n: int, image_seq_len: int) -> None:
    calculate_shift = _pipeline_calculate_shift()
    scheduler = _flux_scheduler()
    cfg = scheduler.config  # type: ignore[attr-defined]
    # Exactly what FluxPipeline.__call__ does.
    sigmas = np.linspace(1.0, 1 / n, n)
    mu = calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)  # type: ignore[attr-defined]
    ref = scheduler.sigmas  # type: ignore[attr-defined]

    assert flux_mu(image_seq_len) == pytest.approx(mu, abs=1e-12)
    got = flux(n, image_seq_len)
    assert got.dtype == torch.float32 and got.shape == ref.shape == (n + 1,)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    validate_sigmas(got, n, end_at_zero=True)


def test_flux_formula() -> None:
    n, seq = 4, 1024
    mu = 0.5 + (1.15 - 0.5) * (seq - 256) / (4096 - 256)
    base = [1.0 - k * (1.0 - 1.0 / n) / (n - 1) for k in range(n)]
    expected = [math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)) for s in base] + [0.0]
    torch.testing.assert_close(flux(n, seq), torch.tensor(expected, dtype=torch.float32))
    # Custom interpolation parameters are honoured.
    assert flux_mu(1000, base_seq_len=0, max_seq_len=1000, base_shift=0.0, max_shift=2.0) == pytest.approx(2.0)


@pytest.mark.parametrize("n", [1, 3, 20, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 12.0])
def test_wan_matches_diffusers(n: int, shift: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    scheduler.set_timesteps(n)
    got = wan(n, shift)
    assert got.dtype == torch.float32 and got.shape == (n + 1,)
    torch.testing.assert_close(got, scheduler.sigmas, atol=1e-6, rtol=0)
    validate_sigmas(got, n, end_at_zero=True)


def test_wan_formula() -> None:
    s = wan(10, 1.0)
    s_min = 1e-3
    base = torch.linspace(1.0, s_min, 10, dtype=torch.float64)
    torch.testing.assert_close(s[:-1], base.float())
    shifted = wan(10, 5.0)
    s_min5 = 5 * s_min / (1 + 4 * s_min)
    base5 = torch.linspace(1.0, s_min5, 10, dtype=torch.float64)
    torch.testing.assert_close(shifted[:-1], (5 * base5 / (1 + 4 * base5)).float())
    # A larger shift spends more steps at high noise.
    assert bool((wan(10, 5.0)[1:-1] > wan(10, 2.0)[1:-1]).all())


def test_registry_and_get_schedule() -> None:
    assert set(SCHEDULES) == {"linear", "flux", "wan"}
    torch.testing.assert_close(get_schedule("linear", 7), linear(7))
    torch.testing.assert_close(get_schedule("flux", 6, image_seq_len=4096), flux(6, 4096))
    torch.testing.assert_close(get_schedule("wan", 9, shift=3.0), wan(9, 3.0))


def test_get_schedule_errors() -> None:
    with pytest.raises(ConfigError) as info:
        get_schedule("karras", 10)
    for name in SCHEDULES:
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="number of steps must be >= 1, got 0"):
        get_schedule("linear", 0)
    with pytest.raises(ConfigError, match="bad arguments for schedule 'linear'.*'shift'"):
        get_schedule("linear", 5, shift=2.0)
    with pytest.raises(ConfigError, match="bad arguments for schedule 'flux'.*'image_seq_len'"):
        get_schedule("flux", 5)  # image_seq_len missing


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_bad_step_count(bad: object) -> None:
    for fn in (linear, lambda n: flux(n, 1024), wan):
        with pytest.raises(ConfigError, match=f"number of steps must be .*>= 1, got {re.escape(repr(bad))}"):
            fn(bad)  # type: ignore[operator]


def test_bad_parameters() -> None:
    with pytest.raises(ConfigError, match="shift must be a finite number > 0, got 0.0"):
        wan(10, shift=0.0)
    with pytest.raises(ConfigError, match="shift must be a finite number > 0, got nan"):
        wan(10, shift=float("nan"))
    with pytest.raises(ConfigError, match="image_seq_len must be an int >= 1, got 0"):
        flux(10, 0)
    with pytest.raises(ConfigError, match="max_seq_len and base_seq_len must differ"):
        flux(10, 1024, base_seq_len=256, max_seq_len=256)


def test_validate_sigmas_accepts_and_returns() -> None:
    s = linear(4)
    assert validate_sigmas(s) is s
    assert validate_sigmas(s, 4) is s
    validate_sigmas(torch.tensor([0.8, 0.3], dtype=torch.float64))  # need not end at 0 by default


def test_validate_sigmas_rejects() -> None:
    with pytest.raises(ConfigError, match="1-D"):
        validate_sigmas(linear(4)[None])
    with pytest.raises(ConfigError, match="5"):
        validate_sigmas(linear(5), 4)
    with pytest.raises(ConfigError, match="at least 2"):
        validate_sigmas(torch.tensor([1.0]))
    with pytest.raises(ConfigError, match=r"sigmas\[2\]"):
        validate_sigmas(torch.tensor([1.0, 0.5, float("nan"), 0.0]))
    with pytest.raises(ConfigError, match=r"sigmas\[1\]"):
        validate_sigmas(torch.tensor([1.0, float("inf"), 0.0]))
    with pytest.raises(ConfigError, match=r"sigmas\[3\]"):
        validate_sigmas(torch.tensor([1.0, 0.7, 0.5, 0.5, 0.0]))
    with pytest.raises(ConfigError, match=r"sigmas\[2\]"):
        validate_sigmas(torch.tensor([1.0, 0.4, 0.6, 0.0]))
    with pytest.raises(ConfigError, match="outside"):
        validate_sigmas(torch.tensor([1.5, 0.5, 0.0]))
    with pytest.raises(ConfigError, match="end at 0"):
        validate_sigmas(torch.tensor([1.0, 0.5, 0.1]), end_at_zero=True)
    with pytest.raises(ConfigError, match="sigmas must be a torch.Tensor, got list"):
        validate_sigmas([1.0, 0.0])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="real floating-point tensor, got dtype torch.int64"):
        validate_sigmas(torch.tensor([2, 1, 0]))
