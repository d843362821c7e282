"""A ReCache-style policy: which steps to recompute, learned with REINFORCE under an exact budget.

ReCache (arXiv 2606.06060; code not released) trains a policy over steps
with REINFORCE, without backpropagating through sampling. Its inputs, its
distribution over steps and how it enforces exactly ``k`` computed steps are
not public; this re-implementation makes the following choices.

- **Policy**: one logit ``theta_s`` per step ``s = 1 .. N-1`` (step 0 always
  computes: nothing is cached before it). The policy sees no input, so the
  learned schedule is static: the same ``k`` steps for every input.
- **Exact budget**: a schedule is a Plackett-Luce draw of ``k - 1`` distinct
  steps without replacement (Gumbel top-``(k-1)`` of ``theta + G``), so every
  sample computes exactly ``k`` steps. Its log-probability, for the draw
  order ``s_1, s_2, ...``, is
  ``log p = sum_t [theta_{s_t} - logsumexp(theta over steps not yet drawn)]``.
- **Reward**: ``r = -L(m) / L(uniform)``, minus the calibration loss (mean
  final-latent MSE against the full-step output, the loss budcache's search
  minimises) normalised by the uniform schedule's loss, so the learning rate
  means the same at every budget and on every model.
- **Estimator**: ``grad = mean_b (r_b - baseline) grad log p_b`` over a batch
  of ``samples`` draws, Adam on ``theta``; the baseline is an exponential
  moving average of the batch-mean reward (decay 0.9), started at the first
  batch's mean.
- **Budgets**: one policy per budget (``fit`` trains for the budget it is
  given, from zero logits); ReCache's single multi-budget policy is not
  reproduced. The evaluator, and so its memo of losses, is shared by budgets.
- **Decoding**: the greedy schedule (step 0 and the ``k - 1`` largest
  logits). The best schedule drawn during training is kept in ``best`` for
  reference but is not what is evaluated.

Losses go through budcache's evaluator (memo, prefix sharing, batching: exact).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from ..errors import ConfigError
from ..policy import CachePolicy
from ..sampler import StaticMask
from ..search.evaluator import Evaluator
from ..search.losses import latent_mse
from .base import MethodRun
from .common import calib_key, check_budget, reuse_sampler, run_controller


def plackett_luce_sample(theta: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` distinct indices drawn without replacement from ``softmax(theta)`` (Gumbel top-k), in draw order."""
    if not 0 <= k <= theta.numel():
        raise ConfigError(f"cannot draw {k} distinct steps out of {theta.numel()}")
    u = torch.rand(theta.shape, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(u))
    return torch.topk(theta.detach().double() + gumbel, k).indices


def plackett_luce_log_prob(theta: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``sum_t [theta_{o_t} - logsumexp(theta over indices not in o_1 .. o_{t-1})]`` (differentiable in theta)."""
    remaining = torch.ones_like(theta, dtype=torch.bool)
    total = theta.new_zeros(())
    for idx in order.tolist():
        total = total + theta[idx] - torch.logsumexp(theta.masked_fill(~remaining, float("-inf")), 0)
        remaining[idx] = False
    return total


class ReCache:
    """REINFORCE-trained exact-budget schedule (choices in the module docstring)."""

    name = "recache"
    kind = "static"

    def __init__(self, *, iterations: int = 40, samples: int = 8, lr: float = 0.1, baseline_decay: float = 0.9,
                 seed: int = 0, batch: int = 64, progress: bool = False) -> None:
        if iterations < 1 or samples < 1:
            raise ConfigError(f"ReCache needs iterations >= 1 and samples >= 1 (got {iterations}, {samples})")
        if not lr > 0 or not 0 <= baseline_decay < 1:
            raise ConfigError(f"ReCache needs lr > 0 and baseline_decay in [0, 1) (got {lr}, {baseline_decay})")
        self.iterations = iterations
        self.samples = samples
        self.lr = lr
        self.baseline_decay = baseline_decay
        self.seed = seed
        self.batch = batch
        self.progress = progress
        self.policy: CachePolicy | None = None
        self.theta: torch.Tensor | None = None
        self.best: tuple[tuple[int, ...], float] | None = None
        self.history: list[dict[str, float]] = []
        self.fit_s = 0.0
        self._evaluators: dict[tuple, Evaluator] = {}

    def evaluator(self, problem: Any, calib: Any) -> Evaluator:
        """One evaluator per calibration set, shared by every budget (its memo carries over)."""
        key = calib_key(problem, calib)
        if key not in self._evaluators:
            self._evaluators[key] = Evaluator(reuse_sampler(problem), calib, loss=latent_mse)
        return self._evaluators[key]

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        check_budget(problem, nfe)
        t0 = time.perf_counter()
        n = problem.steps
        self.history = []
        if nfe == 1 or nfe == n:
            compute = (0,) if nfe == 1 else tuple(range(n))
            self.theta, self.best = torch.zeros(n - 1, dtype=torch.float64), None
            self.policy = CachePolicy(n, compute, meta={"method": "recache", "budget": nfe})
            self.fit_s = time.perf_counter() - t0
            return
        ev = self.evaluator(problem, calib)
        with torch.no_grad():
            ref = ev.loss_of(CachePolicy.uniform(n, nfe).compute)
        ref = ref if ref > 0 else 1.0
        gen = torch.Generator().manual_seed(self.seed)
        theta = torch.zeros(n - 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=self.lr)
        baseline: float | None = None
        best: tuple[tuple[int, ...], float] | None = None
        its = range(self.iterations)
        if self.progress:
            its = tqdm(its, desc=f"ReCache REINFORCE (K={nfe})", leave=False)
        for it in its:
            orders = [plackett_luce_sample(theta, nfe - 1, gen) for _ in range(self.samples)]
            sets = [(0, *sorted(int(s) + 1 for s in o)) for o in orders]
            with torch.no_grad():
                losses = ev.losses(sets)
            rewards = torch.tensor([-loss / ref for loss in losses], dtype=torch.float64)
            mean_r = float(rewards.mean())
            b = mean_r if baseline is None else baseline
            adv = rewards - b
            with torch.enable_grad():  # the caller may sample under no_grad; the policy still learns
                logp = torch.stack([plackett_luce_log_prob(theta, o) for o in orders])
                objective = -(adv * logp).mean()
                opt.zero_grad()
                objective.backward()
            opt.step()
            d = self.baseline_decay
            baseline = mean_r if baseline is None else d * baseline + (1 - d) * mean_r
            for s, loss in zip(sets, losses):
                if best is None or loss < best[1]:
                    best = (s, loss)
            self.history.append({"iteration": it, "mean_loss": float(sum(losses) / len(losses)),
                                 "best_loss": best[1], "baseline": baseline})
        self.theta = theta.detach()
        greedy = (0, *sorted(int(s) + 1 for s in torch.topk(self.theta, nfe - 1).indices))
        with torch.no_grad():
            greedy_loss = ev.loss_of(greedy)
        self.best = best
        self.fit_s = time.perf_counter() - t0
        self.policy = CachePolicy(n, greedy, meta={"method": "recache", "budget": nfe, "calib_loss": greedy_loss,
                                                   "uniform_loss": ref, "best_sampled": list(best[0]),
                                                   "best_sampled_loss": best[1]})

    def sample(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        if self.policy is None:
            raise ConfigError("ReCache has no schedule yet: call fit(problem, calib, nfe)")
        latent, computed = run_controller(problem, StaticMask(self.policy), noise, cond, uncond, batch=self.batch)
        return MethodRun(latent, computed.sum(0).double(), {"computed": computed, "compute": list(self.policy.compute)})
