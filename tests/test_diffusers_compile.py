"""budcache.diffusers.apply with no host sync, and under torch.compile(fullgraph=True).

- No hook-path code reads a tensor back during a generation: ``Tensor.item``,
  ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``tolist`` and
  ``numpy`` are instrumented, and any call issued from budcache's code fails.
- The step still comes out right and stays validated, now from the scheduler's
  host state.
- A compiled transformer with a policy applied compiles with no graph break, a
  fixed handful of graphs (one per variant: compute, skip, residual depth) in
  the first generation and none after, and equals the eager hooked output.
"""

from __future__ import annotations

import shutil
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo
from diffusers.hooks.hooks import CacheContext
from torch._dynamo.utils import counters

import budcache.diffusers as bd
from budcache import tinyflow
from budcache.errors import ConfigError, PolicyError
from budcache.hooks import find_cache
from budcache.policy import CachePolicy
from helpers import StackRuns

torch.set_num_threads(1)

PROMPTS = ["a red circle", "two squares"]
SEEDS = [0, 1]
N, K = 8, 3
POLICY = CachePolicy.uniform(N, K)
READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "__complex__")


def generate(env, guidance=1.0, steps=N, pipe=None, **kw) -> torch.Tensor:
    pipe = pipe or env.pipe
    out = pipe(**env.tf.pipeline_inputs(PROMPTS, guidance, SEEDS), num_inference_steps=steps, output_type="latent",
               **kw)
    return out.images


@pytest.fixture(scope="module")
def env():
    tf = tinyflow.load()
    return SimpleNamespace(tf=tf, pipe=tf.pipeline())


@pytest.fixture(autouse=True)
def _clean(env):
    with torch.no_grad():
        yield
    bd.remove(env.pipe)


class TensorReads:
    """Records every read of a tensor's value into Python, with the code that issued it."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, str]] = []

    def __enter__(self) -> TensorReads:
        self._saved = {n: getattr(torch.Tensor, n) for n in READS}
        for n, fn in self._saved.items():
            setattr(torch.Tensor, n, self._wrap(n, fn))
        return self

    def _wrap(self, name, fn):
        def read(t, *args, **kwargs):
            # the issuer: the innermost frame outside torch itself
            issuer = next((f"{f.filename}:{f.lineno}" for f in reversed(traceback.extract_stack()[:-1])
                           if "/torch/" not in f.filename.replace("\\", "/")), "?")
            self.reads.append((name, issuer))
            return fn(t, *args, **kwargs)
        return read

    def __exit__(self, *exc: object) -> None:
        for n, fn in self._saved.items():
            setattr(torch.Tensor, n, fn)

    def by_budcache(self) -> list[tuple[str, str]]:
        return [r for r in self.reads if "/budcache/" in r[1].replace("\\", "/")]


# ----------------------------------------------------------------------------- no host sync
@pytest.mark.parametrize("mechanism", ["reuse", "forecast2", "vtaylor1", "taylor2"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_no_tensor_is_read_back_during_a_generation(env, guidance, mechanism):
    ref = env.tf.sample(PROMPTS, SEEDS, steps=N, guidance=guidance, policy=POLICY, mechanism=mechanism)
    handle = bd.apply(env.pipe, POLICY, mechanism=mechanism)
    with TensorReads() as reads, StackRuns(env.tf.transformer) as runs:
        out = generate(env, guidance)
    assert reads.by_budcache() == []
    # nor does the rest of FluxPipeline's loop on this model: the whole generation runs without one
    assert reads.reads == []
    passes = 2 if guidance != 1.0 else 1
    assert runs.count == K * passes and handle.stats.stack_runs == K * passes
    assert handle.stats.calls == N * passes and handle.stats.skipped_calls == (N - K) * passes
    assert handle.stats.elements_computed == K * passes * len(PROMPTS)
    torch.testing.assert_close(out, ref.latent, atol=1e-5 * guidance, rtol=0)


def test_the_instrument_catches_the_timestep_resolver(env):
    """``step_from="timestep"`` matches timesteps on the device: the instrument sees its reads."""
    bd.apply(env.pipe, POLICY, step_from="timestep")
    with TensorReads() as reads:
        by_timestep = generate(env)
    assert len(reads.by_budcache()) >= 4 * N
    bd.remove(env.pipe)
    bd.apply(env.pipe, POLICY)
    assert torch.equal(generate(env), by_timestep)


def test_step_from_must_be_known(env):
    with pytest.raises(ConfigError, match="step_from"):
        bd.apply(env.pipe, POLICY, step_from="calls")


# ----------------------------------------------------------------------------- host-side step validation
def _call_at(env, k: int | None):
    """A transformer call where the denoising loop would be at step ``k`` (the scheduler's step_index)."""
    env.pipe.scheduler._step_index = k
    cond = env.tf.encode(["a circle"])
    sigma = env.pipe.scheduler.sigmas[k or 0]
    return env.tf.denoiser()(env.tf.noise([0]), sigma.reshape(1), cond, "cond")


def test_policy_for_another_step_count_is_a_policy_error_before_any_block_runs(env):
    bd.apply(env.pipe, CachePolicy.uniform(10, 4))
    with StackRuns(env.tf.transformer) as runs, \
            pytest.raises(PolicyError, match=r"'steps'.*for 10 steps but the pipeline runs 8"):
        generate(env)
    assert runs.count == 0


def test_img2img_strength_is_a_policy_error(env):
    generate(env)
    bd.apply(env.pipe, POLICY)
    env.pipe.scheduler.set_begin_index(3)
    try:
        with pytest.raises(PolicyError, match="strength"):
            _call_at(env, None)
    finally:
        env.pipe.scheduler.set_begin_index(0)


def test_learned_sigmas_the_scheduler_does_not_run_are_a_policy_error(env):
    base = env.tf.sigmas(N)
    learned = POLICY.with_sigmas((base * 0.98 + 0.02 * torch.linspace(1, 0, N + 1)).tolist())
    bd.apply(env.pipe, learned)
    with pytest.raises(PolicyError, match="sigmas"):
        generate(env)


def test_two_calls_at_one_step_in_one_context_are_an_error(env):
    generate(env)
    bd.apply(env.pipe, POLICY)
    _call_at(env, 0)
    _call_at(env, 1)
    with pytest.raises(ConfigError, match="twice at step 1"):
        _call_at(env, 1)


def test_a_jump_in_steps_starts_clean(env):
    generate(env)
    bd.apply(env.pipe, CachePolicy.from_steps(N, [0, 1, 2, 5]))
    for k in (0, 1, 2):
        _call_at(env, k)
    with pytest.raises(ConfigError, match="first step of a generation must compute"):
        _call_at(env, 6)


def test_a_call_outside_the_denoising_loop_is_a_clear_error(env):
    generate(env)  # the scheduler ends at step_index == N
    bd.apply(env.pipe, POLICY)
    with pytest.raises(ConfigError, match="at step 8 of 8.*step_from='timestep'"):
        _call_at(env, N)


def test_a_context_step_index_takes_precedence(env):
    """Pipelines that pass cache_context(name, step_index=i) are followed even if the scheduler says otherwise."""
    generate(env)
    handle = bd.apply(env.pipe, POLICY)
    decide = handle.resolver.host_decision
    env.pipe.scheduler._step_index = 5
    assert decide(CacheContext("cond", step_index=2)).step == 2
    assert decide(CacheContext("cond")).step == 5
    env.pipe.scheduler._step_index = None
    assert decide(CacheContext("cond")).step == 0


# ----------------------------------------------------------------------------- torch.compile
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()


def _compiled_generations(env, pipe, policy, steps, guidance, mechanism, backend, generations=2, order="apply_first"):
    """Eager hooked output, then ``generations`` runs of the compiled transformer: (eager, outs, graphs per run).

    ``order``: "apply_first" compiles the hooked transformer; "compile_first" applies the policy to a pipeline
    whose transformer is already a ``torch.compile`` wrapper; "in_place" uses ``nn.Module.compile``.
    """
    bd.apply(pipe, policy, mechanism=mechanism)
    eager = generate(env, guidance, steps, pipe=pipe)
    _fresh_dynamo()
    transformer = pipe.transformer
    if order == "in_place":
        transformer.compile(fullgraph=True, backend=backend)
    else:
        if order == "compile_first":
            bd.remove(pipe)
        pipe.transformer = torch.compile(transformer, fullgraph=True, backend=backend)
        if order == "compile_first":
            bd.apply(pipe, policy, mechanism=mechanism)
    outs, graphs = [], []
    try:
        for g in range(generations):
            before = counters["stats"]["unique_graphs"]
            with torch._dynamo.config.patch(error_on_recompile=g > 0):  # a later generation must not recompile
                outs.append(generate(env, guidance, steps, pipe=pipe))
            graphs.append(counters["stats"]["unique_graphs"] - before)
    finally:
        bd.remove(pipe)
        pipe.transformer = transformer
        transformer._compiled_call_impl = None  # undo nn.Module.compile: the module is shared with other tests
    assert not counters["graph_break"], dict(counters["graph_break"])
    return eager, outs, graphs


@pytest.mark.parametrize("mechanism,guidance", [("reuse", 1.0), ("reuse", 3.0), ("forecast2", 3.0)])
def test_compiled_hooks_have_no_graph_break_and_a_fixed_number_of_graphs(env, mechanism, guidance):
    """backend="eager": dynamo's capture only (fast); the inductor test below checks the generated code.

    Three graphs per CFG pass (cache_context): step 0 (no residual yet), a computed step, a skipped step.
    """
    pipe = env.tf.pipeline()
    eager, outs, graphs = _compiled_generations(env, pipe, POLICY, N, guidance, mechanism, "eager")
    assert graphs == [3 * (2 if guidance != 1.0 else 1), 0]
    for out in outs:
        torch.testing.assert_close(out, eager, atol=1e-6 * guidance, rtol=0)


#: Policies that name their estimators (version 2): in sigma (velocity or block residual), and a mixed plan
#: (every skipped step its own estimator, as `budcache search` writes them).
NAMED = {
    "vtaylor1": CachePolicy.uniform(N, K, estimator="vtaylor1"),
    "taylor2": CachePolicy.uniform(N, K, estimator="taylor2"),
    "mixed": CachePolicy(N, POLICY.compute, estimators=["vtaylor1", "vtaylor2", "output", "taylor1", "reuse"]),
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_policies_with_named_estimators_compile_whole(env, name):
    """The search's own policies (estimators in sigma, mixed per step) compile with fullgraph=True: the step's
    sigma is gathered by a 0-d step tensor (indexing with it would read it back), one graph per variant and
    estimator, none added by a second generation, the eager hooked output reproduced."""
    policy = NAMED[name]
    pipe = env.tf.pipeline()
    eager, outs, graphs = _compiled_generations(env, pipe, policy, N, 1.0, None, "eager")
    kinds = len(set(policy.estimators))
    assert 3 <= graphs[0] <= 2 + kinds + 1 and graphs[1] == 0, graphs
    for out in outs:
        torch.testing.assert_close(out, eager, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", ["compile_first", "in_place"])
def test_apply_to_an_already_compiled_transformer_and_module_compile(env, order):
    pipe = env.tf.pipeline()
    eager, outs, graphs = _compiled_generations(env, pipe, POLICY, N, 1.0, "reuse", "eager", order=order)
    assert graphs == [3, 0]
    for out in outs:
        torch.testing.assert_close(out, eager, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["reuse", "taylor2", "vtaylor1"])
def test_compile_helper_keeps_its_residuals_in_its_own_memory(env, name):
    """bd.compile: the compiled pipeline equals the eager hooked one, and after every call the kept residuals
    (and forecast outputs) are copies, so a CUDA graph replay that reuses its output memory cannot reach them."""
    policy = NAMED.get(name, POLICY)
    pipe = env.tf.pipeline()
    bd.apply(pipe, policy)
    eager = generate(env, pipe=pipe)
    cache = find_cache(pipe.transformer).cache
    plain = pipe.transformer
    _fresh_dynamo()
    compiled = bd.compile(pipe, backend="eager", own_memory=True)
    assert pipe.transformer is compiled and compiled._orig_mod is plain
    stored: list[torch.Tensor] = []  # what each call stored, as it left the compiled region (kept alive)
    kept: list[torch.Tensor] = []  # what the cache holds after each call (kept alive: no address reused)
    copy_out = cache.own_memory

    def spy() -> None:
        for st in cache.state_manager._state_cache.values():
            for h, before in zip((st.history, st.outputs), st.owned):
                if h is not before:  # the tensors this call made (older levels are earlier copies)
                    stored.extend(t for t in h.img if before is None or all(t is not u for u in before.img))
        copy_out()
        kept.extend(t for st in cache.state_manager._state_cache.values() for h in (st.history, st.outputs)
                    for t in h.img)

    cache.own_memory = spy
    out = generate(env, pipe=pipe)
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=0)
    made = {t.untyped_storage().data_ptr() for t in stored}
    assert stored and kept and not made & {t.untyped_storage().data_ptr() for t in kept}
    bd.remove(pipe)
    assert pipe.transformer is plain  # remove undoes the helper's compile too


def test_own_memory_survives_an_overwrite_of_the_call_outputs():
    """What a CUDA graph replay does to its outputs (writes the same memory again) leaves copied residuals alone."""
    from budcache.hooks.state import Cache, CacheState

    cache = Cache.__new__(Cache)
    cache.state_manager = SimpleNamespace(_state_cache={"cond": CacheState()})
    pool = torch.arange(6.0).reshape(2, 3)
    st = cache.state_manager._state_cache["cond"]
    st.history = st.history.push(None, pool, None, 0, 2, 2)
    cache.own_memory()
    kept = st.history
    pool.fill_(-1.0)
    assert torch.equal(kept.img[0], torch.arange(6.0).reshape(2, 3))
    cache.own_memory()
    assert st.history is kept  # nothing new stored: nothing copied again


def test_compile_helper_needs_a_policy(env):
    with pytest.raises(ConfigError, match="no budcache policy is applied"):
        bd.compile(env.tf.pipeline(), backend="eager")


def test_explain_reports_one_graph_per_variant_and_no_break(env):
    bd.apply(env.pipe, POLICY)
    generate(env)  # the scheduler's state after a generation; now replay step 0 (compute) and 1 (skip) by hand
    tr = env.pipe.transformer
    x = env.tf.noise([0])
    cond = env.tf.encode(["a circle"])
    kw = {"hidden_states": x, "encoder_hidden_states": cond.prompt_embeds,
          "pooled_projections": cond.pooled_prompt_embeds, "guidance": None,
          "txt_ids": torch.zeros(cond.prompt_embeds.shape[1], 3),
          "img_ids": env.pipe._prepare_latent_image_ids(1, 8, 8, x.device, x.dtype), "return_dict": False}
    for k in (0, 1):
        env.pipe.scheduler._step_index = k
        with tr.cache_context("cond"):
            ex = torch._dynamo.explain(tr)(timestep=env.pipe.scheduler.sigmas[k].reshape(1), **kw)
        assert ex.graph_break_count == 0 and ex.graph_count == 1, ex


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="inductor on CPU needs a C compiler")
def test_inductor_fullgraph_k10_of_28_equals_eager_and_compiles_once(env):
    """The issue's check: tinyflow's transformer, K = 10 of 28, fullgraph=True, inductor on CPU."""
    pipe = env.tf.pipeline()
    eager, outs, graphs = _compiled_generations(env, pipe, CachePolicy.uniform(28, 10), 28, 1.0, "reuse", "inductor")
    assert graphs == [3, 0]  # step 0 (no residual yet), a computed step, a skipped step; none in generation 2
    for out in outs:
        torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- CUDA (not run without a GPU)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_hook_path_never_synchronises():
    """torch's sync debug mode raises on any device-to-host sync inside the hooked transformer calls."""
    tf = tinyflow.load(device="cuda")
    pipe = tf.pipeline()
    bd.apply(pipe, POLICY)
    tr = pipe.transformer

    def strict(*_):
        torch.cuda.set_sync_debug_mode("error")

    def lax(*_):
        torch.cuda.set_sync_debug_mode("default")

    hooks = [tr.register_forward_pre_hook(strict), tr.register_forward_hook(lax)]
    try:
        for guidance in (1.0, 3.0):
            out = pipe(**tf.pipeline_inputs(PROMPTS, guidance, SEEDS), num_inference_steps=N, output_type="latent")
            assert torch.isfinite(out.images).all()
    finally:
        lax()
        for h in hooks:
            h.remove()
        bd.remove(pipe)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", [CachePolicy.uniform(28, 10), CachePolicy.uniform(28, 10, estimator="taylor2")],
                         ids=["reuse", "taylor2"])
def test_cuda_graphs_capture_each_variant_once(policy):
    """mode="reduce-overhead" (CUDA graphs) through bd.compile: equal to eager, a second generation compiles
    nothing, and the residuals kept across calls survive the graphs' reuse of their output memory."""
    tf = tinyflow.load(device="cuda")
    pipe = tf.pipeline()
    bd.apply(pipe, policy)
    inputs = tf.pipeline_inputs(PROMPTS, 1.0, SEEDS)
    eager = pipe(**inputs, num_inference_steps=28, output_type="latent").images
    _fresh_dynamo()
    tr = pipe.transformer
    bd.compile(pipe, mode="reduce-overhead")
    try:
        outs = []
        for g in range(2):
            with torch._dynamo.config.patch(error_on_recompile=g > 0):
                outs.append(pipe(**inputs, num_inference_steps=28, output_type="latent").images.clone())
    finally:
        pipe.transformer = tr
        bd.remove(pipe)
    assert 3 <= counters["stats"]["unique_graphs"] <= 2 + len(set(policy.estimators or ["reuse"])) + 1
    for out in outs:
        torch.testing.assert_close(out, eager, atol=1e-3, rtol=1e-3)
