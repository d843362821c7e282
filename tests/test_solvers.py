"""Tests for budcache.solvers on a Gaussian data distribution, where the flow is analytic.

Data ``x0 ~ N(mu, diag(s0^2))``, ``x_t = (1 - t) x0 + t eps``. Then ``x_t`` is Gaussian with
mean ``m_t = (1 - t) mu`` and variance ``var_t = (1 - t)^2 s0^2 + t^2``, the exact velocity is

    v(x, t) = E[eps - x0 | x_t = x] = -mu + (t - (1 - t) s0^2) / var_t * (x - m_t),

and the probability-flow ODE maps noise ``z`` (at t = 1) to ``x_t = m_t + sqrt(var_t) z``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from budcache.errors import ConfigError
from budcache.schedules import flux, linear, wan
from budcache.solvers import IPNDM, SOLVERS, DPMSolverPP2M, Euler, Solver, get_solver

MU = (0.7, -0.4, 1.3, 0.2)
S0 = (0.3, 0.5, 0.8, 1.0)


class Gaussian:
    """Exact flow of N(mu, diag(s0^2)) data; ``z`` is a batch of noise."""

    def __init__(self, batch: int = 64, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.tensor(MU, dtype=dtype)
        self.s0 = torch.tensor(S0, dtype=dtype)
        self.z = torch.randn(batch, len(MU), generator=g, dtype=torch.float64).to(dtype)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.to(x.dtype)
        m = (1 - t) * self.mu
        var = (1 - t) ** 2 * self.s0**2 + t**2
        return -self.mu + (t - (1 - t) * self.s0**2) / var * (x - m)

    def exact(self, t: float | Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=self.z.dtype)
        return (1 - t) * self.mu + torch.sqrt((1 - t) ** 2 * self.s0**2 + t**2) * self.z


def sample(
    solver: Solver,
    sigmas: Tensor,
    x: Tensor,
    velocity: Callable[[Tensor, Tensor], Tensor],
    history: tuple[Tensor, ...] = (),
    start: int = 0,
    stop: int | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    stop = len(sigmas) - 1 if stop is None else stop
    for k in range(start, stop):
        x, history = solver.step(x, velocity(x, sigmas[k]), k, sigmas, history)
    return x, history


def rms(a: Tensor, b: Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def observed_orders(errors: list[float]) -> list[float]:
    return [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]


ALL = ["euler", "dpmpp2m", "ipndm"]


# (a) accuracy with many steps ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tol"), [("euler", 2e-2), ("dpmpp2m", 2e-3), ("ipndm", 1e-4)]
)
@pytest.mark.parametrize(
    "schedule",
    [lambda: linear(200), lambda: wan(200, 3.0), lambda: flux(200, 1024)],
    ids=["linear", "wan", "flux"],
)
def test_many_steps_match_exact_transport(
    name: str, tol: float, schedule: Callable[[], Tensor]
) -> None:
    sigmas = schedule()
    g = Gaussian(dtype=torch.float32)
    x, _ = sample(get_solver(name), sigmas, g.exact(1.0), g.velocity)
    assert x.dtype == torch.float32
    err = rms(x.double(), g.exact(0.0).double())
    assert err < tol, f"{name}: rms error {err:.2e}"


# (b) convergence order -----------------------------------------------------------------------


def _errors(
    solver: Solver, ns: list[int], start: float = 1.0, end: float = 0.0, warm: bool = False
) -> list[float]:
    g = Gaussian()
    errs = []
    for n in ns:
        sigmas = torch.linspace(start, end, n + 1)
        history: tuple[Tensor, ...] = ()
        if warm:
            # Exact velocities at the grid points above t = 1 (the Gaussian flow extends smoothly),
            # newest first: isolates the Adams-Bashforth order from the warm start.
            h = (start - end) / n
            assert isinstance(solver, IPNDM)
            history = tuple(
                g.velocity(g.exact(start + j * h), torch.tensor(start + j * h, dtype=torch.float64))
                for j in range(1, solver.max_order)
            )
        x, _ = sample(solver, sigmas, g.exact(sigmas[0].double()), g.velocity, history)
        errs.append(rms(x, g.exact(sigmas[-1].double())))
    return errs


def test_order_euler() -> None:
    orders = observed_orders(_errors(Euler(), [32, 64, 128]))
    assert all(abs(p - 1.0) < 0.1 for p in orders), orders  # measured 0.98, 0.99


def test_order_dpmpp2m() -> None:
    # On a linear-in-sigma grid the log-SNR steps do not shrink next to sigma = 1 and sigma = 0
    # (lambda = log((1 - sigma) / sigma), e.g. lambda_1 - lambda_2 -> log 2 near sigma = 0), so
    # the asymptotic regime is reached late at the two ends. Away from them the order is clean:
    orders = observed_orders(_errors(DPMSolverPP2M(), [32, 64, 128], start=0.9, end=0.4))
    assert all(abs(p - 2.0) < 0.1 for p in orders), orders  # measured 2.01, 2.00
    # Starting at sigma = 1 (two first-order steps) and ending with the first-order final step:
    orders = observed_orders(_errors(DPMSolverPP2M(), [32, 64, 128], start=1.0, end=0.2))
    assert all(abs(p - 2.0) < 0.15 for p in orders), orders  # measured 1.99, 1.95


def test_dpmpp2m_converges_to_zero() -> None:
    errs = _errors(DPMSolverPP2M(), [64, 128, 256])
    orders = observed_orders(errs)
    assert errs[0] > errs[1] > errs[2]
    assert 1.5 < orders[-1] < 2.2, orders  # measured 1.65, 1.74 (pre-asymptotic, see above)


def test_order_ipndm_warm_start() -> None:
    # The lower-order warm start (one Euler step, local error O(h^2)) bounds the global order
    # by 2, but the constant is much smaller than for the other solvers.
    ns = [32, 64, 128]
    errs = _errors(IPNDM(), ns)
    orders = observed_orders(errs)
    assert all(1.8 < p < 2.4 for p in orders), orders  # measured 2.10, 2.05
    assert errs[-1] < 0.2 * _errors(DPMSolverPP2M(), ns[-1:])[0]


@pytest.mark.parametrize(("max_order", "tol"), [(1, 0.1), (2, 0.15), (3, 0.2), (4, 0.35)])
def test_order_ipndm_exact_history(max_order: int, tol: float) -> None:
    # Measured: 0.99/1.00, 2.04/2.02, 2.96/2.98, 4.24/4.15.
    orders = observed_orders(_errors(IPNDM(max_order), [64, 128, 256], warm=True))
    assert all(abs(p - max_order) < tol for p in orders), orders


@pytest.mark.parametrize("name", ALL)
def test_step_from_sigma_one_is_finite(name: str) -> None:
    g = Gaussian(dtype=torch.float32)
    sigmas = linear(3)
    assert sigmas[0] == 1.0
    x, history = sample(get_solver(name), sigmas, g.exact(1.0), g.velocity)
    assert torch.isfinite(x).all()
    assert all(torch.isfinite(h).all() for h in history)
    assert rms(x.double(), g.exact(0.0).double()) < 0.5


def test_dpmpp2m_first_order_cases() -> None:
    g = Gaussian()
    sigmas = torch.linspace(1.0, 0.0, 5, dtype=torch.float64)
    solver = DPMSolverPP2M()
    # Steps 0 (from sigma = 1) and 1 (previous step started at sigma = 1) are first order = Euler.
    x_dpm, hist = sample(solver, sigmas, g.z, g.velocity, stop=2)
    x_eul, _ = sample(Euler(), sigmas, g.z, g.velocity, stop=2)
    torch.testing.assert_close(x_dpm, x_eul, atol=1e-12, rtol=0)
    # Step 2 is second order and differs from Euler.
    x2, _ = solver.step(x_dpm, g.velocity(x_dpm, sigmas[2]), 2, sigmas, hist)
    e2, _ = Euler().step(x_dpm, g.velocity(x_dpm, sigmas[2]), 2, sigmas, hist)
    assert not torch.allclose(x2, e2)
    # The final step to sigma = 0 returns the data prediction x - sigma v.
    v = g.velocity(x2, sigmas[3])
    x_last, _ = solver.step(x2, v, 3, sigmas, (torch.zeros_like(x2),))
    torch.testing.assert_close(x_last, x2 - sigmas[3] * v, atol=1e-15, rtol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dpmpp2m_matches_diffusers() -> None:
    from diffusers import DPMSolverMultistepScheduler

    g = Gaussian(dtype=torch.float32)
    for n in (6, 20):
        scheduler = DPMSolverMultistepScheduler(
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            final_sigmas_type="zero",
            flow_shift=3.0,
        )
        scheduler.set_timesteps(n)
        sigmas = scheduler.sigmas.to(torch.float32)
        x_ref = g.exact(sigmas[0])
        x = x_ref.clone()
        history: tuple[Tensor, ...] = ()
        solver = DPMSolverPP2M()
        for k, t in enumerate(scheduler.timesteps):
            x_ref = scheduler.step(g.velocity(x_ref, sigmas[k]), t, x_ref).prev_sample
            x, history = solver.step(x, g.velocity(x, sigmas[k]), k, sigmas, history)
        torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)


def test_ipndm_coefficients() -> None:
    x = torch.zeros(3)
    v, v1, v2, v3 = (torch.full((3,), c) for c in (1.0, 2.0, 3.0, 5.0))
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    dt = -0.5
    cases = [
        ((), 1.0),
        ((v1,), (3 * 1 - 2) / 2),
        ((v1, v2), (23 * 1 - 16 * 2 + 5 * 3) / 12),
        ((v1, v2, v3), (55 * 1 - 59 * 2 + 37 * 3 - 9 * 5) / 24),
    ]
    for hist, v_eff in cases:
        out, new_hist = IPNDM().step(x, v, 0, sigmas, hist)
        torch.testing.assert_close(out, torch.full((3,), dt * v_eff))
        assert new_hist[0] is v and len(new_hist) == min(len(hist) + 1, 3)
    out, new_hist = IPNDM(max_order=2).step(x, v, 0, sigmas, (v1, v2, v3))
    torch.testing.assert_close(out, torch.full((3,), dt * (3 * 1 - 2) / 2))
    assert len(new_hist) == 1 and new_hist[0] is v


def test_ipndm_order_one_is_euler() -> None:
    g = Gaussian(dtype=torch.float32)
    sigmas = flux(12, 4096)
    a, _ = sample(IPNDM(max_order=1), sigmas, g.z, g.velocity)
    b, _ = sample(Euler(), sigmas, g.z, g.velocity)
    assert torch.equal(a, b)


# (c) immutable history, copy and resume --------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_history_not_mutated_and_resume(name: str) -> None:
    g = Gaussian(batch=8, dtype=torch.float32)
    sigmas = wan(12, 5.0)
    solver = get_solver(name)
    x, history = g.exact(1.0), ()
    snapshots = []
    for k in range(len(sigmas) - 1):
        before = (x.clone(), tuple(h.clone() for h in history))
        v = g.velocity(x, sigmas[k])
        x_next, new_history = solver.step(x, v, k, sigmas, history)
        assert isinstance(new_history, tuple)
        assert torch.equal(x, before[0])
        assert len(history) == len(before[1])
        assert all(torch.equal(h, hb) for h, hb in zip(history, before[1]))
        snapshots.append((k, x, history))
        x, history = x_next, new_history
    full = x

    for k_mid, x_mid, h_mid in snapshots[1:]:
        state = copy.deepcopy((x_mid, h_mid))
        resumed, _ = sample(solver, sigmas, state[0], g.velocity, state[1], start=k_mid)
        assert torch.equal(resumed, full)


# (d) gradients w.r.t. sigmas -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("detach_velocity", [False, True])
def test_gradients_wrt_sigmas(name: str, detach_velocity: bool) -> None:
    g = Gaussian(batch=16, dtype=torch.float32)
    sigmas = flux(8, 1024).requires_grad_()

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return g.velocity(x.detach(), t.detach()) if detach_velocity else g.velocity(x, t)

    x, _ = sample(get_solver(name), sigmas, g.exact(1.0), velocity)
    loss = (x - g.exact(0.0)).pow(2).sum()
    loss.backward()
    grad = sigmas.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    assert grad[1:-1].abs().min() > 0  # every interior sigma influences the result


def test_dpmpp2m_gradcheck() -> None:
    g = Gaussian(batch=3)
    solver = DPMSolverPP2M()
    inner = torch.tensor([0.8, 0.6, 0.35, 0.2, 0.05], dtype=torch.float64, requires_grad=True)

    def f(inner: Tensor) -> Tensor:
        sigmas = torch.cat([torch.tensor([0.95], dtype=torch.float64), inner, torch.zeros(1, dtype=torch.float64)])
        x, _ = sample(solver, sigmas, g.exact(0.95), g.velocity)
        return x

    assert torch.autograd.gradcheck(f, (inner,))


# (e) registry --------------------------------------------------------------------------------------


def test_registry() -> None:
    assert set(SOLVERS) == {"euler", "dpmpp2m", "ipndm"}
    from budcache.specs import SOLVER_NAMES

    assert set(SOLVER_NAMES) == set(SOLVERS)  # the torch-free names the settings and the CLI check
    assert isinstance(get_solver("euler"), Euler)
    assert isinstance(get_solver("dpmpp2m"), DPMSolverPP2M)
    solver = get_solver("ipndm", max_order=3)
    assert isinstance(solver, IPNDM) and solver.order == 3
    assert {get_solver(n).order for n in ALL} == {1, 2, 4}
    for n in ALL:
        assert get_solver(n).name == n


def test_unknown_solver() -> None:
    with pytest.raises(ConfigError) as info:
        get_solver("heun")
    for n in SOLVERS:
        assert n in str(info.value)


@pytest.mark.parametrize("bad", [0, 5, 2.0, True])
def test_bad_solver_arguments(bad: object) -> None:
    with pytest.raises(ConfigError, match=rf"max_order must be an int in \[1, 4\], got {bad!r}"):
        IPNDM(max_order=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=rf"max_order must be an int in \[1, 4\], got {bad!r}"):
        get_solver("ipndm", max_order=bad)
    with pytest.raises(ConfigError, match="bad arguments for solver 'euler'"):
        get_solver("euler", max_order=2)


@pytest.mark.parametrize("name", ALL)
def test_bad_step_index(name: str) -> None:
    x = torch.zeros(2)
    with pytest.raises(ConfigError, match=r"step index k must be in \[0, 3\], got 4"):
        get_solver(name).step(x, x, 4, linear(4), ())
    with pytest.raises(ConfigError, match=r"step index k must be in \[0, 3\], got -1"):
        get_solver(name).step(x, x, -1, linear(4), ())


# (f) Euler is bit-exact with diffusers ----------------------------------------------------------


@pytest.mark.parametrize("schedule", ["flux", "wan"])
def test_euler_matches_diffusers_bitwise(schedule: str) -> None:
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = 10
    if schedule == "flux":
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=0.93)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
        scheduler.set_timesteps(n)
    sigmas = scheduler.sigmas
    gen = torch.Generator().manual_seed(1)
    x_ref = torch.randn(2, 16, 8, generator=gen)
    x = x_ref.clone()
    history: tuple[Tensor, ...] = ()
    for k, t in enumerate(scheduler.timesteps):
        v = torch.randn(2, 16, 8, generator=gen) * 3.0
        x_ref = scheduler.step(v, t, x_ref, return_dict=False)[0]
        x, history = Euler().step(x, v, k, sigmas, history)
        assert torch.equal(x, x_ref), k


# shapes and dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_batched_shapes_and_dtypes(name: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    shape = (3, 2, 5, 4)
    x0 = torch.randn(shape, generator=gen).to(dtype)
    target = torch.randn(shape, generator=gen).to(dtype)
    sigmas = linear(6)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return (x - target) / (1.5 - t.to(x.dtype))

    solver = get_solver(name)
    x, history = sample(solver, sigmas, x0, velocity)
    assert x.shape == shape and x.dtype == dtype
    assert all(h.dtype == dtype and h.shape == shape for h in history)
    # Each sample evolves independently of the rest of the batch.
    for i in range(shape[0]):
        xi, _ = sample(solver, sigmas, x0[i : i + 1], lambda x, t: (x - target[i : i + 1]) / (1.5 - t.to(x.dtype)))
        torch.testing.assert_close(xi[0], x[i], atol=0, rtol=0)
