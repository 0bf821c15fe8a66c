"""The cost model, called directly."""

from __future__ import annotations

import pytest

from aiodagger.scheduler.placement import (
    DEFAULT_RUNTIME_S,
    Candidate,
    RuntimeEstimates,
    choose_processor,
    estimated_finish,
    function_key,
)


def test_estimated_finish_adds_wait_run_and_transfer():
    assert estimated_finish(1.0, 0.5, 2_000, 1_000.0) == pytest.approx(3.5)
    assert estimated_finish(0.0, 0.5, 0, 1_000.0) == 0.5


def test_least_loaded_processor_wins():
    cands = [Candidate(0, backlog_s=2.0), Candidate(1, backlog_s=0.5), Candidate(2, backlog_s=1.0)]
    assert choose_processor(cands, runtime_s=0.1) == 1


def test_data_locality_beats_small_backlog():
    cands = [Candidate(0, backlog_s=0.0), Candidate(1, backlog_s=0.05)]
    # 1 GB held on worker 1, 1 GB/s: moving it costs 1 s, waiting costs 0.05 s
    assert choose_processor(cands, 0.01, {1: 1_000_000_000}, bandwidth=1e9) == 1


def test_big_backlog_beats_locality_when_transfer_is_cheap():
    cands = [Candidate(0, backlog_s=0.0), Candidate(1, backlog_s=5.0)]
    assert choose_processor(cands, 0.01, {1: 1_000_000}, bandwidth=1e9) == 0


def test_tie_goes_to_first_candidate():
    cands = [Candidate(3, 0.0), Candidate(4, 0.0)]
    assert choose_processor(cands, 1.0) == 0


def test_no_candidate_is_an_error():
    with pytest.raises(ValueError):
        choose_processor([], 1.0)


def test_runtime_estimates_learn_and_are_keyed_by_code():
    est = RuntimeEstimates(alpha=0.5)

    def make():
        return lambda: None

    f, g = make(), make()
    assert function_key(f) is function_key(g)
    assert est.get(function_key(f)) == DEFAULT_RUNTIME_S
    est.observe(function_key(f), 1.0)
    est.observe(function_key(g), 3.0)
    assert est.get(function_key(f)) == pytest.approx(2.0)


def test_runtime_table_is_bounded():
    est = RuntimeEstimates()
    for i in range(RuntimeEstimates._MAX_ENTRIES + 10):
        est.observe(("key", i), 0.1)
    assert len(est._table) <= RuntimeEstimates._MAX_ENTRIES

