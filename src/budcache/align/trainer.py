"""Stage 2: learn the sigma schedule of a fixed cache mask by backpropagating through the cached sampler.

With the mask ``m`` fixed, the schedule parameters ``theta`` minimise

    L(theta) = mean_{(c, z)} || x_0^{m, sigma(theta)}(z, c) - x_0^{full}(z, c) ||^2

over a calibration set (the teacher is the problem's full-step sampler on its
base schedule; every item has its own noise, drawn afresh in every epoch
after the first). AdamW with a cosine learning rate after a linear warm-up,
gradient accumulation, gradient clipping, and data parallelism over items
(:mod:`budcache.align.distributed`). Computed steps are gradient-checkpointed
(their block stack is re-run in the backward pass). A safetensors checkpoint
after every update makes a run resumable to the same result.

Cached residuals: the cache stores them detached (no graph is kept in the
cache). With ``residual_grad`` (the default) the residual estimate of a skipped
step (reused or forecast) still passes its gradient to the steps that computed
it (a straight-through term with value zero), which makes the gradient exact;
with ``residual_grad=False`` the gradient stops at the cache, as in the
reference implementation. That
truncated gradient ignores how a computed step's sigma changes the residual
every following skipped step reuses; on tinyflow it can point the wrong way
(BENCHMARKS.md, "Alignment": a finite-difference check).
"""

from __future__ import annotations

import json
import math
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .. import __version__
from ..errors import ConfigError, ModelOutputError
from ..estimators import newton
from ..hooks import MECHANISMS, ArgumentNames, BlockContract, block_contract, block_stack, find_cache
from ..io import atomic_write_bytes
from ..policy import CachePolicy
from ..problems.data import CalibrationSet, run_items
from ..sampler import Controller, Sampler, SamplerState, StaticMask, policy_plan, select_items
from ..search.losses import get_loss
from . import distributed
from .params import PARAMETRISATIONS, Schedule, make_schedule

CHECKPOINT_FORMAT = "budcache.align-checkpoint"
_MAX_CHECKPOINT_BYTES = 256 * 2**20


@dataclass(frozen=True)
class AlignConfig:
    """Alignment settings; defaults are the reference implementation's (1 epoch, batch 1 x 8 accumulated)."""

    parametrisation: str = "ld3"
    lr: float = 5e-4
    weight_decay: float = 1e-4
    clip: float = 1.0
    warmup: float = 0.05
    accumulation: int = 8
    micro_batch: int = 1
    epochs: int = 1
    seed: int = 0
    fresh_noise: bool = True
    loss: str = "mse"
    offset_bound: float = 0.005
    offset_indices: str = "all"
    grad_checkpointing: bool = True
    residual_grad: bool = True

    def __post_init__(self) -> None:
        if self.parametrisation not in PARAMETRISATIONS:
            raise ConfigError(f"parametrisation {self.parametrisation!r} is unknown; choose one of "
                              f"{list(PARAMETRISATIONS)}")
        for name in ("lr", "clip"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a finite number > 0 (got {v!r})")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0 (got {self.weight_decay!r})")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a fraction of the updates in [0, 1) (got {self.warmup!r})")
        for name in ("accumulation", "micro_batch", "epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1 (got {v!r})")
        get_loss(self.loss)
        if self.offset_indices not in ("all", "skipped"):
            raise ConfigError(f"offset_indices must be 'all' or 'skipped' (got {self.offset_indices!r})")
        if not self.offset_bound > 0:
            raise ConfigError(f"offset_bound must be > 0 (got {self.offset_bound!r})")


@dataclass
class AlignResult:
    """The aligned policy, its learned sigmas and the per-update history."""

    policy: CachePolicy
    sigmas: torch.Tensor
    history: list[dict[str, Any]] = field(default_factory=list)
    updates: int = 0
    wall_s: float = 0.0


def lr_factor(step: int, total: int, warmup: float) -> float:
    """``(s+1)/(W+1)`` for ``s < W``, then ``(1 + cos(pi (s - W) / (T - W))) / 2``; ``W = floor(warmup T)``."""
    w = int(warmup * total)
    if step < w:
        return (step + 1) / (w + 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, total - w)))


# ------------------------------------------------------------------------ checkpointed denoiser
class _Recorder(Controller):
    """Passes a controller's decisions through and remembers the latest ``(step, compute)``."""

    def __init__(self, inner: Controller) -> None:
        self.inner = inner
        self.last: tuple[int, torch.Tensor] | None = None

    def decide(self, step: int, state: SamplerState) -> torch.Tensor:
        d = self.inner.decide(step, state)
        self.last = (step, d)
        return d


class _ResidualTap:
    """Gives the cached residual estimate a gradient path (straight-through), with the cache's values unchanged.

    On a computed step ``j`` it keeps ``R_j = h_out - h_in`` of the block stack
    with its graph (torch hooks on the first and last block), the newest
    ``order + 1`` per cache context. On a skipped step ``k`` it rebuilds the
    mechanism's estimate ``R_hat_k`` from those graph residuals (reuse:
    ``R_hat = R_j``; forecast: :func:`budcache.estimators.newton`, the
    definition the hooks use) and adds
    ``R_hat - R_hat.detach()`` (zero) to the first block's output. The value is
    the cache's; the gradient also reaches the sigmas and latents of the steps
    that computed the residuals. Image stream only: the model's output reads
    only it on a skipped step.
    """

    def __init__(self, transformer: torch.nn.Module, order: int = 0) -> None:
        blocks = block_stack(transformer)
        self.head, self.tail = blocks[0][1], blocks[-1][1]
        self.head_contract, self.tail_contract = block_contract(type(self.head)), block_contract(type(self.tail))
        self.head_args = ArgumentNames(self.head.forward)
        self.order = int(order)
        self.phase: str | None = None      # "compute" | "skip" | None (inactive)
        self.context = ""
        self.step = -1
        self.h_in: torch.Tensor | None = None
        self.text_len = 0  # text tokens entering the head (a joined tail stream starts with them)
        self.residual: dict[str, list[tuple[int, torch.Tensor]]] = {}  # newest first
        self._handles = [self.head.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.head.register_forward_hook(self._head_out, with_kwargs=True),
                         self.tail.register_forward_hook(self._tail_out, with_kwargs=True)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.phase == "compute":
            kw = self.head_args.bind(args, kwargs)
            self.h_in = kw[self.head_contract.hidden_arg]
            e = kw.get(self.head_contract.encoder_arg) if self.head_contract.encoder_out is not None else None
            self.text_len = e.shape[1] if e is not None else 0

    @staticmethod
    def _image(out: Any, contract: BlockContract) -> torch.Tensor:
        """The image stream of a block's output, by the block's contract."""
        return out[contract.hidden_out] if isinstance(out, tuple) else out

    def _tail_out(self, module: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if self.phase == "compute" and self.h_in is not None:
            h_out = self._image(out, self.tail_contract)
            if self.tail_contract.joined and self.text_len:
                h_out = h_out[:, self.text_len:]  # the joined stream is cat([e, h], dim=1)
            if h_out.shape != self.h_in.shape:
                raise ConfigError(f"residual gradients: the last block's image stream has shape "
                                  f"{tuple(h_out.shape)} but the first block took {tuple(self.h_in.shape)}")
            hist = self.residual.setdefault(self.context, [])
            hist.insert(0, (self.step, h_out - self.h_in))
            del hist[self.order + 1:]
            self.h_in = None

    def estimate(self, hist: list[tuple[int, torch.Tensor]], k: int) -> torch.Tensor:
        """``R_hat_k`` from graph residuals, newest first: :func:`budcache.estimators.newton` of ``order``
        in the step index (the hooks' own definition, here on tensors that keep their graph)."""
        values = tuple(r for _, r in hist)
        steps = tuple(torch.full((r.shape[0],), float(s), device=r.device) for s, r in hist)
        return newton(values, steps, k, self.order)

    def _head_out(self, module: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        hist = self.residual.get(self.context)
        if self.phase != "skip" or not hist:
            return None
        r = self.estimate(hist, self.step)
        h = self._image(out, self.head_contract)
        h = h + (r - r.detach()).to(h.dtype)
        if not isinstance(out, tuple):
            return h
        i = self.head_contract.hidden_out
        return tuple(h if j == i else t for j, t in enumerate(out))


class CheckpointedDenoiser:
    """Runs each computed step under ``torch.utils.checkpoint`` (its activations are recomputed in backward).

    Only steps where every element computes are checkpointed; cached steps
    (embedding and output head only) run plainly. The residual-cache hooks
    keep state, so the recomputation must not push a residual a second time:
    when a cache is still installed at recompute time, its residual history is
    set back to the one before the step, the step's decision is repeated, and
    the history is put back afterwards. When the sampler has already removed
    its cache (the usual case: backward after the run), a fully computed step
    is exactly the plain transformer call. With a ``tap``
    (:class:`_ResidualTap`) the reused residuals carry gradients.
    """

    def __init__(self, inner: Any, recorder: _Recorder, checkpointing: bool = True,
                 tap: _ResidualTap | None = None) -> None:
        self.inner = inner
        self.transformer = getattr(inner, "transformer", None)
        self.recorder = recorder
        self.checkpointing = checkpointing
        self.tap = tap
        self.checkpointed = 0
        self.recomputed = 0

    def _cache(self) -> Any:
        return find_cache(self.transformer) if self.transformer is not None else None

    def _call(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, context: str, phase: str | None,
              step: int = -1) -> torch.Tensor:
        if self.tap is None:
            return self.inner(x, sigma, cond, context)
        self.tap.phase, self.tap.context, self.tap.step = phase, context, step
        try:
            return self.inner(x, sigma, cond, context)
        finally:
            self.tap.phase = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, context: str) -> torch.Tensor:
        if not torch.is_grad_enabled() or self.recorder.last is None:
            return self.inner(x, sigma, cond, context)
        step, compute = self.recorder.last
        cache = self._cache()
        n = int(compute.sum())
        if cache is not None and n < compute.numel():
            return self._call(x, sigma, cond, context, "skip" if n == 0 else None, step)
        if not self.checkpointing:
            return self._call(x, sigma, cond, context, "compute", step)
        before = cache.snapshot() if cache is not None else None
        first = [True]

        def run(x_: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
            if first[0]:
                first[0] = False
                return self._call(x_, s_, cond, context, "compute", step)
            self.recomputed += 1
            live = self._cache()
            if live is None:
                return self.inner(x_, s_, cond, context)
            now = live.snapshot()
            live.restore(before)
            live.set_decision(step, compute)
            try:
                return self.inner(x_, s_, cond, context)
            finally:
                live.restore(now)

        self.checkpointed += 1
        return _checkpoint(run, x, sigma, use_reentrant=False)


def student_sampler(problem: Any, mask: Sequence[bool] | CachePolicy, sigmas: torch.Tensor,
                    grad_checkpointing: bool = True,
                    residual_grad: bool = False) -> Sampler:
    """The cached sampler of ``mask`` on ``sigmas`` (all-compute: the plain sampler, no hooks).

    Call :func:`release` on it after the backward pass when ``residual_grad`` is on.
    """
    plan = policy_plan(mask) if isinstance(mask, CachePolicy) and mask.estimators is not None else None
    m = [bool(v) for v in (mask.mask if isinstance(mask, CachePolicy) else mask)]
    controller = None if all(m) else StaticMask(torch.tensor(m), plan)
    sampler = problem.make_sampler(controller, len(m), sigmas=sigmas)
    if sampler.steps != len(m):
        raise ConfigError(f"the sampler has {sampler.steps} steps but the mask {len(m)}")
    tap = None
    # Velocity forecasts keep their graph (nothing to tap); the straight-through residual tap serves one
    # version-1 residual mechanism on every skipped step.
    velocity_only = sampler.residual_depth == 0
    if residual_grad and not all(m) and not velocity_only and sampler.legacy:
        if sampler.mechanism not in MECHANISMS or getattr(sampler.denoiser, "transformer", None) is None:
            raise ConfigError(f"residual gradients need a residual mechanism ({', '.join(MECHANISMS)}) on a "
                              f"diffusers transformer, not {sampler.mechanism!r}; align with residual_grad=False")
        tap = _ResidualTap(sampler.denoiser.transformer, MECHANISMS[sampler.mechanism])
    if grad_checkpointing or tap is not None:
        rec = _Recorder(sampler.controller)
        sampler.controller = rec
        sampler.denoiser = CheckpointedDenoiser(sampler.denoiser, rec, grad_checkpointing, tap)
    return sampler


def release(sampler: Sampler) -> None:
    """Remove the residual tap's torch hooks of a :func:`student_sampler` (no-op without one)."""
    den = sampler.denoiser
    if isinstance(den, CheckpointedDenoiser) and den.tap is not None:
        den.tap.remove()
        den.tap.residual.clear()


# ------------------------------------------------------------------------ data
def _rows(cs: CalibrationSet, rows: Sequence[int]) -> tuple[torch.Tensor, Any, Any, torch.Tensor]:
    idx = torch.tensor(list(rows), dtype=torch.long, device=cs.noise.device)
    return cs.noise[idx], select_items(cs.cond, idx), select_items(cs.uncond, idx), cs.teacher[idx]


def fresh_seed(seed: int, epoch: int, item: int) -> int:
    """Noise seed of calibration item ``item`` in ``epoch`` >= 1 (depends on nothing else)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, epoch, item]).generate_state(1)[0] & 0x7FFFFFFF)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the ``n`` items in ``epoch`` (seeded permutation)."""
    return [int(i) for i in np.random.default_rng([int(seed) & 0xFFFFFFFF, 7919, epoch]).permutation(n)]


# ------------------------------------------------------------------------ checkpoint
def _fingerprint(cfg: AlignConfig, calib: CalibrationSet, mask: Sequence[bool], base: torch.Tensor,
                 effective: int) -> dict[str, Any]:
    c = asdict(cfg)
    for k in ("micro_batch", "grad_checkpointing"):  # do not change the result
        c.pop(k)
    return {"config": c, "effective_batch": effective, "calibration": calib.digest, "items": len(calib),
            "mask": "".join("C" if v else "." for v in mask),
            "base_sigmas": [float(v) for v in base.detach().cpu().double().tolist()]}


def save_checkpoint(path: Path, sched: Schedule, opt: torch.optim.Optimizer, step: int,
                    fingerprint: dict[str, Any], history: list[dict[str, Any]],
                    selection: dict[str, Any] | None = None) -> None:
    """Parameters, AdamW moments and progress as one safetensors file (metadata: JSON), atomically."""
    from safetensors.torch import save

    st = opt.state.get(sched.theta, {})
    tensors = {"theta": sched.theta.detach().clone()}
    if st:
        tensors["exp_avg"] = st["exp_avg"].detach().clone()
        tensors["exp_avg_sq"] = st["exp_avg_sq"].detach().clone()
        tensors["adam_step"] = torch.as_tensor(st["step"]).detach().clone().reshape(1).to(torch.float64)
    meta = {"format": CHECKPOINT_FORMAT, "version": 1, "step": step, "fingerprint": fingerprint,
            "history": history, "selection": selection, "budcache_version": __version__}
    atomic_write_bytes(path, save(tensors, metadata={"budcache": json.dumps(meta, allow_nan=False)}))


_OPTIMIZER_TENSORS = ("exp_avg", "exp_avg_sq", "adam_step")


def load_checkpoint(path: Path, sched: Schedule, opt: torch.optim.Optimizer,
                    fingerprint: dict[str, Any]) -> tuple[int, list[dict[str, Any]], dict[str, Any] | None]:
    """Restore a :func:`save_checkpoint` file; every problem is a ConfigError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    def bad(why: str) -> ConfigError:
        return ConfigError(f"alignment checkpoint '{path}': {why}")

    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise bad("is a directory, expected a file")
        if info.st_size > _MAX_CHECKPOINT_BYTES:
            raise bad(f"file is {info.st_size} bytes, larger than the limit of {_MAX_CHECKPOINT_BYTES}")
        raw = path.read_bytes()
    except OSError as exc:
        raise bad(f"cannot read it ({exc.strerror or exc})") from None
    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("budcache", "null"))
    except (SafetensorError, ValueError, TypeError, AttributeError) as exc:
        raise bad(f"not a safetensors file with budcache metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise bad(f"not a budcache alignment checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if meta.get("version") != 1:
        raise bad(f"unsupported version {meta.get('version')!r} (supported: 1)")
    if meta.get("fingerprint") != fingerprint:
        raise bad("it belongs to another alignment (settings, mask, schedule or calibration set differ); "
                  "remove it or run without --resume")
    step, history = meta.get("step"), meta.get("history")
    if type(step) is not int or step < 0 or not isinstance(history, list):
        raise bad("fields 'step' or 'history' are malformed")
    theta = tensors.get("theta")
    if theta is None or theta.shape != sched.theta.shape or theta.dtype != sched.theta.dtype:
        raise bad(f"parameter 'theta' missing or of the wrong shape (expected {tuple(sched.theta.shape)})")
    if not bool(torch.isfinite(theta).all()):
        raise bad("parameter 'theta' is not finite")
    with torch.no_grad():
        sched.theta.copy_(theta)
    unknown = sorted(set(tensors) - {"theta", *_OPTIMIZER_TENSORS})
    if unknown:
        raise bad(f"unexpected tensor(s) {unknown}")
    present = [k for k in _OPTIMIZER_TENSORS if k in tensors]
    if present and len(present) != len(_OPTIMIZER_TENSORS):
        missing = [k for k in _OPTIMIZER_TENSORS if k not in tensors]
        raise bad(f"optimizer state incomplete: tensor(s) {missing} missing")
    if present:
        for k in ("exp_avg", "exp_avg_sq"):
            if tensors[k].shape != theta.shape:
                raise bad(f"optimizer state {k!r} has the wrong shape")
        if tensors["adam_step"].numel() != 1:
            raise bad("optimizer state 'adam_step' must hold one value")
        sd = opt.state_dict()
        sd["state"] = {0: {"step": tensors["adam_step"].reshape(()).to(torch.float32),
                           "exp_avg": tensors["exp_avg"].clone(), "exp_avg_sq": tensors["exp_avg_sq"].clone()}}
        opt.load_state_dict(sd)
    selection = meta.get("selection")
    if selection is not None and not (isinstance(selection, dict) and isinstance(selection.get("sigmas"), list)
                                      and len(selection["sigmas"]) == sched.steps + 1):
        raise bad("field 'selection' is malformed")
    return step, history, selection


# ------------------------------------------------------------------------ the trainer
def _as_mask(policy: CachePolicy | Sequence[bool]) -> list[bool]:
    if isinstance(policy, CachePolicy):
        return list(policy.mask)
    m = [bool(v) for v in policy]
    if not m or not m[0]:
        raise ConfigError("the mask must have at least one step, and step 0 must compute")
    return m


def base_sigmas(problem: Any, policy: CachePolicy | Sequence[bool]) -> torch.Tensor:
    """The schedule alignment starts from: the policy's own sigmas, else the problem's N-step schedule."""
    if isinstance(policy, CachePolicy) and policy.sigmas is not None:
        ref = problem.sigmas(policy.steps)
        return torch.tensor(policy.sigmas, dtype=ref.dtype, device=ref.device)
    return problem.sigmas(len(_as_mask(policy)))


def align(problem: Any, calib: CalibrationSet, policy: CachePolicy | Sequence[bool],
          cfg: AlignConfig = AlignConfig(), *, init_sigmas: torch.Tensor | None = None,
          checkpoint: str | Path | None = None, resume: bool = False, progress: bool = False,
          validation: CalibrationSet | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> AlignResult:
    """Learn the sigmas of ``policy``'s mask on ``calib``; returns the policy with the learned sigmas.

    ``problem`` gives ``make_sampler(controller, steps, sigmas=...)``, ``sigmas(steps)`` and
    ``calibration(prompts, seeds)`` (used for fresh noise after the first epoch). A policy
    computing every step aligns the plain sampler of that many steps ("Original-Opt").
    The schedule starts at ``init_sigmas``, else the policy's sigmas, else the problem's schedule.
    With a ``validation`` set, its loss is measured at the start and after every epoch, and the
    schedule with the lowest one is returned (the start included, so alignment never returns a
    schedule that is worse on it).
    Under ``torch.distributed`` every rank runs this with the same arguments.
    """
    t0 = time.perf_counter()
    if calib.teacher is None:
        raise ConfigError("the calibration set has no teacher outputs; build it with problem.calibration")
    mask = _as_mask(policy)
    student = policy if isinstance(policy, CachePolicy) and policy.estimators is not None else mask
    n_steps = len(mask)
    base = base_sigmas(problem, policy) if init_sigmas is None else init_sigmas.detach()
    if base.numel() != n_steps + 1:
        raise ConfigError(f"initial sigmas have {base.numel()} values but the mask has {n_steps} steps "
                          f"(expected {n_steps + 1})")
    sched = make_schedule(cfg.parametrisation, base, mask, offset_bound=cfg.offset_bound,
                          offset_indices=cfg.offset_indices)
    rank, size = distributed.world()
    distributed.broadcast(sched.theta.data)
    opt = torch.optim.AdamW([sched.theta], lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = get_loss(cfg.loss)
    n = len(calib)
    effective = cfg.micro_batch * cfg.accumulation * size
    per_epoch = -(-n // effective)
    total = cfg.epochs * per_epoch
    fp = _fingerprint(cfg, calib, mask, base, effective)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    start, history = 0, []
    selection: dict[str, Any] | None = None
    if validation is not None:
        fp["validation"] = validation.digest
    if resume and ckpt is not None and ckpt.exists():
        start, history, selection = load_checkpoint(ckpt, sched, opt, fp)
        start = min(start, total)
    out = policy if isinstance(policy, CachePolicy) else CachePolicy.from_mask(mask)
    plain_out = CachePolicy.full(n_steps) if all(mask) else CachePolicy(n_steps, out.compute)

    def val_loss() -> float:
        with torch.no_grad():
            cand = plain_out.with_sigmas(sched().detach().double().cpu().tolist())
        return policy_loss(problem, validation, cand, loss=cfg.loss)

    def consider(updates: int) -> None:
        nonlocal selection
        v = val_loss()
        if history:
            history[-1]["validation_loss"] = v
        if selection is None or v < selection["loss"]:
            with torch.no_grad():
                selection = {"loss": v, "updates": updates, "start_loss": v if selection is None else
                             selection["start_loss"],
                             "sigmas": [float(x) for x in sched().detach().double().cpu().tolist()]}

    if validation is not None and selection is None:
        consider(0)
    epoch_data: dict[int, tuple[CalibrationSet, dict[int, int]]] = {}

    def data_for(epoch: int, items: list[int]) -> tuple[CalibrationSet, list[int]]:
        """Calibration rows of ``items``: the set itself, or this epoch's fresh-noise items."""
        if epoch == 0 or not cfg.fresh_noise:
            return calib, items
        if epoch not in epoch_data:
            epoch_data.clear()
            order = epoch_order(n, cfg.seed, epoch)
            mine = [i for j in range(per_epoch) for i in order[j * effective:(j + 1) * effective][rank::size]]
            with torch.no_grad():
                cs = problem.calibration([calib.prompts[i] for i in mine],
                                         [fresh_seed(cfg.seed, epoch, i) for i in mine])
            epoch_data[epoch] = (cs, {i: r for r, i in enumerate(mine)})
        cs, where = epoch_data[epoch]
        return cs, [where[i] for i in items]

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc=f"align {sched.kind} K={sum(mask)}/{n_steps}",
                   dynamic_ncols=True)
    try:
        for s in range(start, total):
            epoch, j = divmod(s, per_epoch)
            items = epoch_order(n, cfg.seed, epoch)[j * effective:(j + 1) * effective]
            count = len(items)
            mine = items[rank::size]
            opt.zero_grad(set_to_none=False)
            if sched.theta.grad is None:
                sched.theta.grad = torch.zeros_like(sched.theta)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for b in range(0, len(mine), cfg.micro_batch):
                cs, rows = data_for(epoch, mine[b:b + cfg.micro_batch])
                noise, cond, uncond, teacher = _rows(cs, rows)
                sampler = student_sampler(problem, student, sched(), cfg.grad_checkpointing, cfg.residual_grad)
                try:
                    x = sampler.run(sampler.start(noise), cond, uncond).x
                    per_item = loss_fn(x.float(), teacher.float())           # (b,)
                    (per_item.sum() / count).backward(inputs=[sched.theta])
                except ModelOutputError as exc:
                    raise ModelOutputError(f"{exc} during alignment update {s}") from None
                finally:
                    release(sampler)
                loss_sum += per_item.detach().double().sum()
            distributed.all_reduce_sum(sched.theta.grad)
            distributed.all_reduce_sum(loss_sum)
            if not bool(torch.isfinite(sched.theta.grad).all()):
                raise ModelOutputError(f"alignment update {s}: the gradient is not finite")
            grad_norm = float(torch.nn.utils.clip_grad_norm_([sched.theta], cfg.clip))
            lr = cfg.lr * lr_factor(s, total, cfg.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            entry = {"step": s, "epoch": epoch, "loss": float(loss_sum) / count, "lr": lr, "grad_norm": grad_norm}
            history.append(entry)
            if validation is not None and (s + 1) % per_epoch == 0:
                consider(s + 1)
            if ckpt is not None and rank == 0:
                save_checkpoint(ckpt, sched, opt, s + 1, fp, history, selection)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{entry['loss']:.3e}")
            if on_step is not None:
                on_step(entry)
    finally:
        if bar is not None:
            bar.close()
    with torch.no_grad():
        sig = sched().detach().clone()
    if selection is not None:
        sig = torch.tensor(selection["sigmas"], dtype=sig.dtype, device=sig.device)
    meta = {"parametrisation": sched.kind, "learnable_sigmas": len(sched.learnable), "epochs": cfg.epochs,
            "calibration_pairs": n, "calibration_digest": calib.digest, "updates": total,
            "effective_batch": effective, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "clip": cfg.clip,
            "warmup": cfg.warmup, "fresh_noise": cfg.fresh_noise, "seed": cfg.seed, "loss": cfg.loss,
            "plain": all(mask), "residual_grad": cfg.residual_grad,
            "final_update_loss": history[-1]["loss"] if history else None,
            "validation": None if selection is None else {
                "pairs": len(validation), "start_loss": selection["start_loss"], "loss": selection["loss"],
                "selected_after_updates": selection["updates"]},
            "budcache_version": __version__}
    if sched.kind == "offset":
        meta.update(offset_bound=cfg.offset_bound, offset_indices=cfg.offset_indices)
    aligned = out.with_sigmas(sig.double().cpu().tolist()).with_meta(alignment=meta)
    return AlignResult(aligned, sig, history, total, time.perf_counter() - t0)


def align_plain(problem: Any, calib: CalibrationSet, nfe: int, cfg: AlignConfig = AlignConfig(),
                **kw: Any) -> AlignResult:
    """"Original-Opt": align the plain ``nfe``-step sampler (no caching) to the full-step teacher."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ConfigError(f"nfe must be an int >= 1 (got {nfe!r})")
    return align(problem, calib, CachePolicy.full(nfe), cfg, **kw)


@torch.no_grad()
def final_latents(problem: Any, calib: CalibrationSet, policy: CachePolicy | None, *, plain_steps: int | None = None,
                  batch: int = 64) -> torch.Tensor:
    """Final latents of ``calib``'s items under a policy (its own steps and sigmas), or the plain sampler."""
    if policy is None:
        sampler = problem.make_sampler(None, plain_steps)
    else:
        sampler = problem.make_sampler(None if all(policy.mask) and policy.sigmas is None else policy, policy.steps)
    return run_items(sampler, calib.noise, calib.cond, calib.uncond, batch)


@torch.no_grad()
def policy_loss(problem: Any, calib: CalibrationSet, policy: CachePolicy | None, *, loss: str = "mse",
                plain_steps: int | None = None) -> float:
    """Mean per-item loss of a policy (its own sigmas if it has them) against ``calib``'s teacher."""
    lat = final_latents(problem, calib, policy, plain_steps=plain_steps)
    return float(get_loss(loss)(lat.float(), calib.teacher.float()).mean())
