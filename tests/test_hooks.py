"""Tests for budcache.hooks: residual-cache hooks on a diffusers transformer's block stack."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from budcache.denoisers import FluxCond, FluxDenoiser
from budcache.errors import ConfigError
from budcache.hooks import MECHANISMS, CacheHandle, ResidualHistory, apply_cache, find_cache
from helpers import StackRuns, make_transformer

torch.set_num_threads(1)

ROWS, COLS, TXT = 4, 4, 8


def make_inputs(b: int, seed: int = 1) -> tuple[torch.Tensor, FluxCond]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, ROWS * COLS, 16, generator=g)
    cond = FluxCond(torch.randn(b, TXT, 32, generator=g), torch.randn(b, 32, generator=g))
    return x, cond


def sig(b: int, value: float) -> torch.Tensor:
    return torch.full((b,), value)


def ones(b: int) -> torch.Tensor:
    return torch.ones(b, dtype=torch.bool)


def zeros(b: int) -> torch.Tensor:
    return torch.zeros(b, dtype=torch.bool)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def tr() -> FluxTransformer2DModel:
    return make_transformer()


@pytest.fixture
def den(tr) -> FluxDenoiser:
    return FluxDenoiser(tr, ROWS, COLS)


# ----------------------------------------------------------------------------- install / remove
def test_remove_restores_bit_identical_outputs(tr, den):
    x, cond = make_inputs(2)
    x2 = torch.randn_like(x)
    before = den(x, sig(2, 0.7), cond, "cond")
    before_direct = tr(hidden_states=x, timestep=sig(2, 0.7), pooled_projections=cond.pooled_prompt_embeds,
                       encoder_hidden_states=cond.prompt_embeds, txt_ids=torch.zeros(TXT, 3),
                       img_ids=den._position_ids(TXT, x.device, x.dtype)[0], return_dict=False)[0]
    plain_step1 = den(x2, sig(2, 0.4), cond, "cond")

    handle = apply_cache(tr, "reuse")
    assert find_cache(tr) is handle
    handle.set_decision(0, ones(2))
    hooked = den(x, sig(2, 0.7), cond, "cond")
    handle.set_decision(1, zeros(2))
    skipped = den(x2, sig(2, 0.4), cond, "cond")
    handle.remove()

    # computing every element through the hooks changes nothing
    assert torch.equal(hooked, before)
    # the skip really used the cache (it is an approximation of the real step)
    assert not torch.allclose(skipped, plain_step1, atol=1e-4)
    # after remove: no cache, no decision needed, bit-identical outputs
    assert find_cache(tr) is None
    assert torch.equal(den(x, sig(2, 0.7), cond, "cond"), before)
    assert torch.equal(den(x2, sig(2, 0.4), cond, "cond"), plain_step1)
    after_direct = tr(hidden_states=x, timestep=sig(2, 0.7), pooled_projections=cond.pooled_prompt_embeds,
                      encoder_hidden_states=cond.prompt_embeds, txt_ids=torch.zeros(TXT, 3),
                      img_ids=den._position_ids(TXT, x.device, x.dtype)[0], return_dict=False)[0]
    assert torch.equal(after_direct, before_direct)
    handle.remove()  # a second remove is a no-op
    assert find_cache(tr) is None


def test_context_manager_removes_the_cache(tr, den):
    x, cond = make_inputs(1)
    before = den(x, sig(1, 0.5), cond, "cond")
    with apply_cache(tr, "forecast2") as handle:
        assert find_cache(tr) is handle
    assert find_cache(tr) is None
    assert torch.equal(den(x, sig(1, 0.5), cond, "cond"), before)


def test_call_without_decision_is_an_error(tr, den):
    x, cond = make_inputs(1)
    with apply_cache(tr):
        with pytest.raises(ConfigError, match="set_decision"):
            den(x, sig(1, 0.5), cond, "cond")


def test_install_twice_is_a_config_error(tr, den):
    first = apply_cache(tr, "reuse")
    with pytest.raises(ConfigError, match="FluxTransformer2DModel already has a budcache cache"):
        apply_cache(tr, "forecast1")
    assert find_cache(tr) is first
    # the first cache still works, and after removing it a new one can be installed
    x, cond = make_inputs(1)
    first.set_decision(0, ones(1))
    den(x, sig(1, 0.5), cond, "cond")
    assert first.stats.stack_runs == 1
    first.remove()
    second = apply_cache(tr, "forecast1")
    assert find_cache(tr) is second
    second.remove()


def test_unknown_mechanism_is_a_config_error(tr):
    with pytest.raises(ConfigError, match="'teacache'.*reuse"):
        apply_cache(tr, "teacache")
    assert find_cache(tr) is None


class NoStack(nn.Module):
    """A model with a config but no block stack diffusers would recognise."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"hidden": 4}
        self.body = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, hidden_states):
        return self.body[0](hidden_states)


class OddBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden_states):
        return self.proj(hidden_states)


class OddTransformer(nn.Module):
    """Blocks where diffusers looks for them, but of a class its block registry does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"hidden": 4}
        self.transformer_blocks = nn.ModuleList([OddBlock(), OddBlock()])

    def forward(self, hidden_states):
        for b in self.transformer_blocks:
            hidden_states = b(hidden_states)
        return hidden_states


def test_model_without_block_stack_is_a_config_error():
    model = NoStack()
    with pytest.raises(ConfigError, match="NoStack has no block stack that budcache recognises"):
        apply_cache(model)
    assert getattr(model, "_diffusers_hook", None) is None  # nothing was installed
    x = torch.randn(2, 4)
    assert torch.equal(model(x), model.body[0](x))


def test_blocks_unknown_to_the_registry_are_a_config_error():
    model = OddTransformer()
    with pytest.raises(ConfigError, match=r"OddTransformer: block transformer_blocks\.0 \(OddBlock\) is not in "
                                          r"diffusers' transformer block registry"):
        apply_cache(model)
    assert getattr(model, "_diffusers_hook", None) is None


# ----------------------------------------------------------------------------- ResidualHistory
B, T, D = 3, 5, 4


def full_push(h: ResidualHistory, step: int, img: torch.Tensor, txt: torch.Tensor | None, depth: int):
    return h.push(torch.arange(img.shape[0]), img, txt, step, img.shape[0], depth)


def history_of(fn, steps: list[int], depth: int, with_txt: bool = True) -> ResidualHistory:
    h = ResidualHistory()
    for s in steps:
        img = fn(s)
        h = full_push(h, s, img, 2.0 * img + 1.0 if with_txt else None, depth)
    return h


def coeffs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("depth", [1, 3])
def test_reuse_estimate_returns_the_newest_residual(depth):
    g = torch.Generator().manual_seed(0)
    res = {s: torch.randn(B, T, D, generator=g) for s in (0, 2, 5)}
    h = history_of(res.__getitem__, [0, 2, 5], depth)
    assert len(h.img) == depth
    img, txt = h.estimate(7, MECHANISMS["reuse"])
    assert torch.equal(img, res[5])
    assert torch.equal(txt, 2.0 * res[5] + 1.0)


def test_history_keeps_depth_newest_first():
    h = history_of(lambda s: torch.full((B, T, D), float(s)), [0, 1, 3, 4, 6], depth=3)
    assert len(h.img) == len(h.txt) == len(h.steps) == 3
    assert [float(s[0]) for s in h.steps] == [6.0, 4.0, 3.0]
    assert [float(r[0, 0, 0]) for r in h.img] == [6.0, 4.0, 3.0]


@pytest.mark.parametrize("steps", [[0, 1], [1, 4], [0, 3, 4]])
@pytest.mark.parametrize("k", [5, 6, 9])
def test_forecast1_is_exact_on_linear_residuals(steps, k):
    a, b, _ = coeffs(1)
    h = history_of(lambda s: a + b * s, steps, depth=2)
    img, txt = h.estimate(k, MECHANISMS["forecast1"])
    want = a + b * k
    torch.testing.assert_close(img, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(txt, 2.0 * want + 1.0, atol=1e-12, rtol=0)
    # reuse would be visibly off on the same history
    assert (h.estimate(k, 0)[0] - want).abs().max() > 0.1


@pytest.mark.parametrize("steps", [[0, 1, 2], [0, 2, 3], [1, 4, 5]])
@pytest.mark.parametrize("k", [6, 8])
def test_forecast2_is_exact_on_quadratic_residuals(steps, k):
    a, b, c = coeffs(2)
    h = history_of(lambda s: a + b * s + c * s * s, steps, depth=3)
    img, txt = h.estimate(k, MECHANISMS["forecast2"])
    want = a + b * k + c * k * k
    torch.testing.assert_close(img, want, atol=1e-10, rtol=0)
    torch.testing.assert_close(txt, 2.0 * want + 1.0, atol=1e-10, rtol=0)
    # first order is not enough for a quadratic
    assert (h.estimate(k, 1)[0] - want).abs().max() > 0.1


def test_forecast_falls_back_to_the_order_the_history_has():
    a, b, c = coeffs(3)
    one = history_of(lambda s: a + b * s + c * s * s, [0], depth=3)
    assert torch.equal(one.estimate(4, 2)[0], a)  # one entry: reuse
    two = history_of(lambda s: a + b * s, [0, 2], depth=3)
    torch.testing.assert_close(two.estimate(5, 2)[0], a + 5 * b, atol=1e-12, rtol=0)  # two entries: linear


def test_history_without_text_stream():
    h = history_of(lambda s: torch.full((B, T, D), float(s)), [0, 1], depth=2, with_txt=False)
    img, txt = h.estimate(3, 1)
    assert txt is None
    torch.testing.assert_close(img, torch.full((B, T, D), 3.0))


def test_push_on_a_subset_leaves_the_other_elements_unchanged():
    g = torch.Generator().manual_seed(4)
    r0 = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    new1 = torch.randn(1, T, D, generator=g, dtype=torch.float64)
    h0 = full_push(ResidualHistory(), 0, r0, -r0, depth=2)
    h1 = h0.push(torch.tensor([1]), new1, -new1, 2, B, depth=2)

    # the old history is an immutable value (one real entry; the older level is empty, step -1)
    assert torch.equal(h0.img[0], r0) and h0.steps[0].tolist() == [0.0] * B
    assert h0.steps[1].tolist() == [-1.0] * B
    # element 1 gained the new residual and moved its old one down a level
    assert torch.equal(h1.img[0][1], new1[0]) and torch.equal(h1.img[1][1], r0[1])
    assert torch.equal(h1.txt[0][1], -new1[0]) and torch.equal(h1.txt[1][1], -r0[1])
    # elements 0 and 2 are untouched: still their step-0 residual, with no older entry
    assert torch.equal(h1.img[0][[0, 2]], r0[[0, 2]])
    assert torch.equal(h1.txt[0][[0, 2]], -r0[[0, 2]])
    assert h1.steps[0].tolist() == [0.0, 2.0, 0.0]
    assert h1.steps[1].tolist() == [-1.0, 0.0, -1.0]

    img, txt = h1.estimate(4, 1)
    # element 1 extrapolates linearly from steps 0 and 2 ...
    torch.testing.assert_close(img[1], new1[0] + (new1[0] - r0[1]), atol=1e-12, rtol=0)
    torch.testing.assert_close(txt[1], -(new1[0] + (new1[0] - r0[1])), atol=1e-12, rtol=0)
    # ... the others have one computed step, so they reuse it
    assert torch.equal(img[[0, 2]], r0[[0, 2]])


def test_estimate_before_any_computed_step_raises():
    with pytest.raises(ConfigError, match="first step of a generation must compute"):
        ResidualHistory().estimate(0, 0)


# ----------------------------------------------------------------------------- hooks on a transformer
def test_reuse_on_an_unchanged_input_reproduces_the_computed_output(tr, den):
    x, cond = make_inputs(2)
    handle = apply_cache(tr, "reuse")
    with StackRuns(tr) as runs:
        handle.set_decision(0, ones(2))
        computed = den(x, sig(2, 0.6), cond, "cond")
        handle.set_decision(1, zeros(2))
        reused = den(x, sig(2, 0.6), cond, "cond")
    handle.remove()
    assert runs.count == 1
    assert handle.stats.stack_runs == 1 and handle.stats.skipped_calls == 1 and handle.stats.calls == 2
    torch.testing.assert_close(reused, computed, atol=1e-5, rtol=0)


def test_skip_at_the_first_step_raises(tr, den):
    x, cond = make_inputs(2)
    with apply_cache(tr) as handle:
        handle.set_decision(0, zeros(2))
        with pytest.raises(ConfigError, match="first step of a generation must compute"):
            den(x, sig(2, 0.9), cond, "cond")
        handle.set_decision(0, torch.tensor([True, False]))
        with pytest.raises(ConfigError, match="step 0 skips elements that have no cached residual"):
            den(x, sig(2, 0.9), cond, "cond")


def test_skip_in_a_context_that_never_computed_raises(tr, den):
    x, cond = make_inputs(1)
    with apply_cache(tr) as handle:
        handle.set_decision(0, ones(1))
        den(x, sig(1, 0.9), cond, "cond")
        handle.set_decision(1, zeros(1))
        den(x, sig(1, 0.8), cond, "cond")  # "cond" has a residual
        with pytest.raises(ConfigError, match="no cached residual"):
            den(x, sig(1, 0.8), cond, "uncond")  # "uncond" has its own, empty cache


def test_changing_batch_size_on_a_skipped_step_raises(tr, den):
    x2, cond2 = make_inputs(2)
    x3, cond3 = make_inputs(3)
    with apply_cache(tr) as handle:
        handle.set_decision(0, ones(2))
        den(x2, sig(2, 0.9), cond2, "cond")
        handle.set_decision(1, zeros(3))
        with pytest.raises(ConfigError, match=r"cached residual has shape \(2, 16, 32\).*\(3, 16, 32\).*new batch "
                                               r"size or resolution starts at step 0"):
            den(x3, sig(3, 0.8), cond3, "cond")
        # a decision for the wrong number of elements is named as such
        handle.set_decision(1, zeros(2))
        with pytest.raises(ConfigError, match="decision covers 2 elements but the batch has 3"):
            den(x3, sig(3, 0.8), cond3, "cond")
        # starting again at step 0 with the new batch size works
        handle.set_decision(0, ones(3))
        first = den(x3, sig(3, 0.9), cond3, "cond")
        handle.set_decision(1, zeros(3))
        out = den(x3, sig(3, 0.8), cond3, "cond")
    assert out.shape == first.shape == x3.shape
    assert torch.isfinite(out).all()


def test_subset_computes_only_the_chosen_elements(tr, den):
    x, cond = make_inputs(3)
    x1 = x + 0.3 * torch.randn_like(x)
    plain = den(x1, sig(3, 0.5), cond, "cond")
    handle = apply_cache(tr, "reuse")
    handle.set_decision(0, ones(3))
    den(x, sig(3, 0.8), cond, "cond")
    snap = handle.snapshot()
    handle.set_decision(1, zeros(3))
    all_skipped = den(x1, sig(3, 0.5), cond, "cond")
    handle.restore(snap)
    with StackRuns(tr) as runs:
        handle.set_decision(1, torch.tensor([True, False, True]))
        mixed = den(x1, sig(3, 0.5), cond, "cond")
    handle.remove()
    assert runs.batches == [2]  # one run of the stack, on the two computing elements only
    assert handle.stats.elements_computed == 3 + 2
    torch.testing.assert_close(mixed[[0, 2]], plain[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], all_skipped[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[1], plain[1], atol=1e-4)


def test_snapshot_restore_round_trip(tr, den):
    x, cond = make_inputs(2)
    xs = [x + 0.2 * k * torch.randn_like(x) for k in range(4)]
    sigmas = [0.9, 0.7, 0.5, 0.3]
    handle = apply_cache(tr, "forecast1")
    for k in (0, 1):
        handle.set_decision(k, ones(2))
        den(xs[k], sig(2, sigmas[k]), cond, "cond")
    snap = handle.snapshot()
    assert set(snap) == {"cond"}
    assert isinstance(snap["cond"], ResidualHistory) and len(snap["cond"].img) == 2
    saved = [r.clone() for r in snap["cond"].img]

    handle.set_decision(2, zeros(2))
    skipped = den(xs[2], sig(2, sigmas[2]), cond, "cond")
    # move on: computing steps 2 and 3 replaces the cached residuals
    for k in (2, 3):
        handle.set_decision(k, ones(2))
        den(xs[k], sig(2, sigmas[k]), cond, "cond")
    assert not torch.equal(handle.snapshot()["cond"].img[0], saved[0])
    # the snapshot is a value: later steps did not change it
    assert all(torch.equal(a, b) for a, b in zip(snap["cond"].img, saved))

    handle.restore(snap)
    handle.set_decision(2, zeros(2))
    again = den(xs[2], sig(2, sigmas[2]), cond, "cond")
    assert torch.equal(again, skipped)

    handle.restore(None)
    with pytest.raises(ConfigError, match="no cached residual"):
        den(xs[2], sig(2, sigmas[2]), cond, "cond")
    handle.remove()


def test_reset_forgets_the_cache(tr, den):
    x, cond = make_inputs(1)
    with apply_cache(tr) as handle:
        handle.set_decision(0, ones(1))
        den(x, sig(1, 0.9), cond, "cond")
        handle.reset()
        assert handle.snapshot() == {}
        handle.set_decision(1, zeros(1))
        with pytest.raises(ConfigError, match="no cached residual"):
            den(x, sig(1, 0.8), cond, "cond")


def test_handle_is_a_cache_handle(tr):
    handle = apply_cache(tr, "forecast2")
    try:
        assert isinstance(handle, CacheHandle)
        assert handle.order == 2 and handle.mechanism == "forecast2"
    finally:
        handle.remove()


def test_push_with_a_permuted_full_index_assigns_each_element_its_own_residual():
    h = ResidualHistory().push(torch.tensor([2, 0, 1]), torch.arange(3.0).view(3, 1, 1), None, 0, 3, 1)
    assert h.img[0].flatten().tolist() == [1.0, 2.0, 0.0]
