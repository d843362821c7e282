"""Candidates searched at the same time (``budcache.search.job``): which may run together, and how an error or
Ctrl-C in one stops the others."""

from __future__ import annotations

import threading
import time

import pytest

from budcache.search.job import Cancellable, SearchCancelled, concurrent_candidates, run_concurrently


class _Ev:
    """A stand-in evaluator: counts its requests, each taking a few milliseconds."""

    sa_batch = 1

    def __init__(self) -> None:
        self.calls = 0
        self.answered = threading.Event()  # set once a request has been counted

    def losses(self, computes):
        self.calls += 1
        self.answered.set()
        time.sleep(0.005)
        return [0.0 for _ in computes]

    def plan_losses(self, plans):
        return self.losses(plans)


def _looping(ev, n=2000):
    def attempt(k, i, m, cancel=None):
        e = ev if cancel is None else Cancellable(ev, cancel)
        for _ in range(n):
            e.losses([(0,)])
        return (float(i), i, m)
    return attempt


def test_which_candidates_run_at_once():
    assert concurrent_candidates({"vtaylor1": "local", "taylorseer": "inprocess"})
    assert not concurrent_candidates({"vtaylor1": "ray", "taylorseer": "inprocess"})  # its plans score here
    assert not concurrent_candidates({"vtaylor1": "inprocess", "taylorseer": "inprocess"})
    assert not concurrent_candidates({"vtaylor1": "local"})


def test_results_come_back_in_candidate_order_from_both_threads():
    seen = {}

    def attempt(k, i, m, cancel=None):
        seen[m] = threading.current_thread() is threading.main_thread()
        return (float(10 - i), i, m, k)

    out = run_concurrently(attempt, 7, ["vtaylor1", "taylorseer"], {"vtaylor1": "local", "taylorseer": "inprocess"})
    assert out == [(10.0, 0, "vtaylor1", 7), (9.0, 1, "taylorseer", 7)]
    assert seen == {"vtaylor1": False, "taylorseer": True}  # the in-process candidate stays on this thread


def test_a_failing_worker_candidate_stops_the_in_process_one_and_its_error_is_raised():
    ev = _Ev()

    def attempt(k, i, m, cancel=None):
        if m == "vtaylor1":
            raise ValueError("boom in vtaylor1")
        return _looping(ev)(k, i, m, cancel)

    with pytest.raises(ValueError, match="boom in vtaylor1"):
        run_concurrently(attempt, 3, ["vtaylor1", "taylorseer"], {"vtaylor1": "local", "taylorseer": "inprocess"})
    assert ev.calls < 2000  # stopped at a request, not run to the end


def test_ctrl_c_in_the_in_process_candidate_stops_the_others_before_it_is_raised():
    ev = _Ev()

    def attempt(k, i, m, cancel=None):
        if m == "taylorseer":
            ev.answered.wait(5)  # the worker candidate is under way (has made a request) when Ctrl-C comes
            raise KeyboardInterrupt
        return _looping(ev)(k, i, m, cancel)

    with pytest.raises(KeyboardInterrupt):
        run_concurrently(attempt, 3, ["vtaylor1", "taylorseer"], {"vtaylor1": "local", "taylorseer": "inprocess"})
    assert 0 < ev.calls < 2000
    assert not [t for t in threading.enumerate() if t.name.startswith("budcache-search-")]  # joined, none left


def test_cancellable_passes_attributes_through_and_refuses_after_cancel():
    ev, cancel = _Ev(), threading.Event()
    c = Cancellable(ev, cancel)
    assert c.sa_batch == 1 and c.losses([(0,), (1,)]) == [0.0, 0.0] and c.plan_losses([(0,)]) == [0.0]
    cancel.set()
    with pytest.raises(SearchCancelled):
        c.losses([(0,)])
    with pytest.raises(SearchCancelled):
        c.plan_losses([(0,)])
    assert ev.calls == 2
    with pytest.raises(SearchCancelled):
        c.check({"step": 3})  # as the search's on_step callback


def test_cancellable_has_plan_losses_only_where_the_evaluator_has():
    class NoPlans:
        def losses(self, computes):
            return [1.0 for _ in computes]

    c = Cancellable(NoPlans(), threading.Event())
    assert not hasattr(c, "plan_losses") and c.losses([(0,)]) == [1.0]


def test_a_candidate_whose_requests_are_all_memo_hits_still_stops():
    """The annealing checks the cancel flag every step, so a search that sends no request still stops."""
    started = threading.Event()

    def attempt(k, i, m, cancel=None):
        if m == "taylorseer":
            started.wait(5)
            raise KeyboardInterrupt
        c = Cancellable(_Ev(), cancel)
        started.set()
        for step in range(10**7):
            c.check({"step": step})
        return (0.0, i, m)

    with pytest.raises(KeyboardInterrupt):
        run_concurrently(attempt, 3, ["vtaylor1", "taylorseer"], {"vtaylor1": "local", "taylorseer": "inprocess"})


def test_paired_winner_beats_every_other_candidate_on_more_pairs_than_it_loses():
    """The pairs rule: ``a`` beats ``b`` on more pairs than it loses; ties count for neither side."""
    from budcache.search.job import pair_wins, paired_winner

    # a has the lowest mean only through one pair; b is lower than a and c on 3 of 5 pairs
    a = [0.0, 0.0, -50.0, 1.0, 1.0]
    b = [-1.0, -1.0, -1.0, 0.5, 2.0]
    c = [1.0, 1.0, 0.0, 0.0, 0.5]
    assert paired_winner({"a": a, "b": b, "c": c}) == "b"
    assert pair_wins({"a": a, "b": b, "c": c})["b"] == {"a": 3, "c": 3}
    assert pair_wins({"a": a, "b": b, "c": c})["a"] == {"b": 2, "c": 3}
    # a cycle (a > b > c > a) has no winner
    assert paired_winner({"a": [0, 0, 2], "b": [1, 1, 0], "c": [2, -1, 1]}) is None
    # an even split is no win: ties on one pair, and one pair each
    assert paired_winner({"a": [0.0, 1.0, 5.0], "b": [1.0, 0.0, 5.0]}) is None
    assert paired_winner({"a": [0.0, 1.0, 4.0], "b": [1.0, 0.0, 5.0]}) == "a"
