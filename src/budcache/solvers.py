"""Fixed-grid ODE solvers for velocity-predicting flow-matching models.

Convention: ``x_sigma = (1 - sigma) x0 + sigma eps`` and the model predicts ``v = eps - x0``,
so ``dx/dsigma = v``. A solver is a tiny step function with explicit, immutable history::

    x, hist = X_T, ()
    for k in range(len(sigmas) - 1):
        v = model(x, sigmas[k])
        x, hist = solver.step(x, v, k, sigmas, hist)

``history`` is a tuple of past tensors (velocities or data predictions, never modified in place), so
``(x, history, k)`` is a complete, copyable sampler state. All coefficients are tensor
expressions of ``sigmas`` (differentiable, no host sync) cast to ``x.dtype``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError

__all__ = [
    "DPMSolverPP2M",
    "Euler",
    "IPNDM",
    "SOLVERS",
    "Solver",
    "get_solver",
]


def _check_index(k: int, sigmas: Tensor) -> None:
    if sigmas.ndim != 1:
        raise ConfigError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    if not 0 <= k < sigmas.shape[0] - 1:
        raise ConfigError(f"step index k must be in [0, {sigmas.shape[0] - 2}], got {k}")


class Solver(ABC):
    """A fixed-grid solver: ``step`` maps ``(x_k, v_k, history)`` to ``(x_{k+1}, history')``."""

    name: str = ""
    order: int = 1

    @abstractmethod
    def step(
        self, x: Tensor, v: Tensor, k: int, sigmas: Tensor, history: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Advance x at sigmas[k] to sigmas[k+1] given the velocity v at (x, sigmas[k]).

        Returns (x_next, new_history); ``history`` is () at the first step and is not mutated.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Euler(Solver):
    """First-order Euler: ``x_{k+1} = x_k + (s_{k+1} - s_k) v_k``.

    Bit-identical to diffusers' FlowMatchEulerDiscreteScheduler.step for float32 inputs.
    """

    name = "euler"
    order = 1

    def step(
        self, x: Tensor, v: Tensor, k: int, sigmas: Tensor, history: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        _check_index(k, sigmas)
        dt = (sigmas[k + 1] - sigmas[k]).to(x.dtype)
        return x + dt * v, ()


class DPMSolverPP2M(Solver):
    """DPM-Solver++(2M), data prediction, midpoint variant, for flow sigmas.

    ``alpha = 1 - s``, ``lambda = log(alpha / s)``, ``D0 = x0_hat = x - s_k v``, ``h = lambda_{k+1} - lambda_k``::

        x_{k+1} = (s_{k+1}/s_k) x_k - alpha_{k+1} (exp(-h) - 1) (D0 + D1/2)
                = (s_{k+1}/s_k) x_k + c (D0 + D1/2),   c = alpha_{k+1} - s_{k+1} alpha_k / s_k = 1 - s_{k+1}/s_k

    with ``D1 = (h / h_prev) (D0 - x0_hat_{k-1})``, ``h_prev = lambda_k - lambda_{k-1}``.
    ``c`` is finite at ``s_k = 1``; the first-order update (``D1 = 0``) equals Euler.
    First order is used on the first step, when the previous step started at ``s = 1``
    (``h_prev = inf``) and on the final step (lower_order_final), which for ``s_{k+1} = 0`` gives
    ``x_{k+1} = x0_hat``. History: ``(x0_hat_k,)``.
    """

    name = "dpmpp2m"
    order = 2

    def step(
        self, x: Tensor, v: Tensor, k: int, sigmas: Tensor, history: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        _check_index(k, sigmas)
        s0 = sigmas[k].to(x.dtype)
        s1 = sigmas[k + 1].to(x.dtype)
        a0 = 1.0 - s0
        a1 = 1.0 - s1
        ratio = s1 / s0
        c = (s0 - s1) / s0  # = alpha_{k+1} - s_{k+1} alpha_k / s_k
        x0_hat = x - s0 * v
        if not history or k == 0 or k == sigmas.shape[0] - 2:
            # First step, or final step (lower_order_final): x_{k+1} = (s_{k+1}/s_k) x + c x0_hat.
            return ratio * x + c * x0_hat, (x0_hat,)

        (prev_x0_hat,) = history
        sp = sigmas[k - 1].to(x.dtype)
        ap = 1.0 - sp
        # Second order needs finite h and h_prev: s_{k+1} > 0 and s_{k-1}, s_k < 1.
        # Unsafe inputs are replaced before the logs so that gradients stay finite.
        ok = (ap > 0) & (a0 > 0) & (s1 > 0)
        one = torch.ones_like(s0)
        ap_safe = torch.where(ok, ap, one)
        a0_safe = torch.where(ok, a0, 0.5 * one)
        s1_safe = torch.where(ok, s1, 0.5 * one)
        a1_safe = torch.where(ok, a1, 0.5 * one)
        lam_p = torch.log(ap_safe) - torch.log(sp)
        lam_0 = torch.log(a0_safe) - torch.log(s0)
        lam_1 = torch.log(a1_safe) - torch.log(s1_safe)
        h = lam_1 - lam_0
        h_prev = torch.where(ok, lam_0 - lam_p, one)
        half_w = torch.where(ok, 0.5 * h / h_prev, torch.zeros_like(s0))
        d = x0_hat + half_w * (x0_hat - prev_x0_hat)
        return ratio * x + c * d, (x0_hat,)


class IPNDM(Solver):
    """Improved PNDM: Adams-Bashforth on the velocity with a lower-order warm start.

    ``v_eff = v`` | ``(3v - v1)/2`` | ``(23v - 16v1 + 5v2)/12`` | ``(55v - 59v1 + 37v2 - 9v3)/24``
    (uniform-step coefficients, as many past velocities as available, up to ``max_order - 1``),
    then ``x_{k+1} = x_k + (s_{k+1} - s_k) v_eff``. History: past velocities, newest first.
    """

    name = "ipndm"
    order = 4

    def __init__(self, max_order: int = 4) -> None:
        if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= 4:
            raise ConfigError(f"max_order must be an int in [1, 4], got {max_order!r}")
        self.max_order = max_order
        self.order = max_order

    def __repr__(self) -> str:
        return f"IPNDM(max_order={self.max_order})"

    def step(
        self, x: Tensor, v: Tensor, k: int, sigmas: Tensor, history: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        _check_index(k, sigmas)
        past = history[: self.max_order - 1]
        if len(past) == 0:
            v_eff = v
        elif len(past) == 1:
            v_eff = (3.0 * v - past[0]) / 2.0
        elif len(past) == 2:
            v_eff = (23.0 * v - 16.0 * past[0] + 5.0 * past[1]) / 12.0
        else:
            v_eff = (55.0 * v - 59.0 * past[0] + 37.0 * past[1] - 9.0 * past[2]) / 24.0
        dt = (sigmas[k + 1] - sigmas[k]).to(x.dtype)
        new_history = ((v,) + past)[: self.max_order - 1]
        return x + dt * v_eff, new_history


SOLVERS: dict[str, type[Solver]] = {
    "euler": Euler,
    "dpmpp2m": DPMSolverPP2M,
    "ipndm": IPNDM,
}


def get_solver(name: str, **kwargs: Any) -> Solver:
    """Instantiate the solver registered as ``name`` with ``kwargs``."""
    key = name.lower() if isinstance(name, str) else name
    if key not in SOLVERS:
        raise ConfigError(f"unknown solver {name!r}; valid names: {', '.join(sorted(SOLVERS))}")
    try:
        return SOLVERS[key](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for solver {name!r}: {exc}") from exc
