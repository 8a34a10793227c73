"""benchmarks/warm_start.py: its normalisation, aggregation and goal check on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
from helpers import benchmark_script


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_script("warm_start.py", "warm_start_benchmark")


def test_task_range_spans_every_search_and_ignores_trials_that_did_not_complete(bench):
    searches = {"scratch": [0.6, None, 0.7], "defaults": [0.8, 0.75], "warm": [None, 0.9]}
    assert bench.task_range(searches) == (0.6, 0.9)
    assert bench.task_range({"scratch": [None], "warm": []}) is None


def test_normalised_curve_by_hand(bench):
    # Range 0.6 .. 0.9: best so far after 1 trial none (0), after 3 0.75 -> 0.5, after 5 0.9 -> 1,
    # and after 10 and 20 (past its last trial) still 1.
    values = [None, 0.75, 0.7, 0.66, 0.9]
    assert bench.normalised_curve(values, 0.6, 0.9) == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    assert bench.normalised_curve([0.6, 0.72], 0.6, 0.9, (1, 2)) == pytest.approx([0.0, 0.4])
    # Every configuration alike: nothing to separate, every search is at the best.
    assert bench.normalised_curve([0.8, 0.8], 0.8, 0.8, (1, 2)) == [1.0, 1.0]


def test_mean_interval_by_hand(bench):
    # Values 1, 2, 3: mean 2, sample sd 1, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3).
    interval = bench.mean_interval([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert (interval.mean, interval.n) == (2.0, 3)
    assert (interval.low, interval.high) == pytest.approx((2 - half, 2 + half), abs=1e-6)
    # Differences may be negative: nothing is clipped to [0, 1].
    negative = bench.mean_interval([-0.02, -0.04, -0.03])  # sd 0.01: -0.03 +- 4.302653 * 0.01 / sqrt(3)
    assert (negative.low, negative.high) == pytest.approx((-0.03 - 0.0248414, -0.03 + 0.0248414), abs=1e-6)
    single = bench.mean_interval([0.5])
    assert single.mean == 0.5 and math.isnan(single.low) and str(single) == "0.500"


def row(task, seed, curves, test):
    return {"task": task, "seed": seed, "curves": curves, "test": test}


def test_summary_averages_seeds_within_a_task_before_tasks(bench):
    checkpoints = (1, 3)
    rows = [
        # task a, two seeds: warm's curve means (0.5, 1.0); defaults (0.0, 0.5); scratch 0.
        row("a", 0, {"scratch": [0, 0], "defaults": [0.0, 0.4], "warm": [0.4, 1.0]},
            {"scratch": 0.5, "defaults": 0.80, "warm": 0.82}),
        row("a", 1, {"scratch": [0, 0], "defaults": [0.0, 0.6], "warm": [0.6, 1.0]},
            {"scratch": 0.5, "defaults": 0.80, "warm": 0.80}),
        # task b, one seed.
        row("b", 0, {"scratch": [1, 1], "defaults": [0.2, 0.9], "warm": [0.3, 0.7]},
            {"scratch": 0.7, "defaults": 0.90, "warm": 0.86}),
    ]
    summary = bench.summarise(rows, checkpoints)
    # Tasks weigh equally whatever their seeds: warm after 1 trial is mean(0.5, 0.3) = 0.4.
    assert summary["curves"]["warm"][1].mean == pytest.approx(0.4)
    assert summary["curves"]["warm"][3].mean == pytest.approx(0.85)
    assert summary["curves"]["defaults"][3].mean == pytest.approx((0.5 + 0.9) / 2)
    assert summary["curves"]["scratch"][1].n == 2
    # Paired test differences per task: a: mean(+0.02, 0) = +0.01; b: -0.04 -> mean -0.015.
    assert summary["test_difference"].mean == pytest.approx(-0.015)
    half = 12.706205 * math.sqrt(((0.01 + 0.015) ** 2 + (-0.04 + 0.015) ** 2) / 1) / math.sqrt(2)
    assert summary["test_difference"].high == pytest.approx(-0.015 + half, abs=1e-6)
    assert summary["test"]["warm"].mean == pytest.approx((0.81 + 0.86) / 2)


def test_goal_lines_say_met_or_not_with_the_figures(bench):
    interval = bench.Interval
    summary = {
        "curves": {"warm": {3: interval(0.80, 0.7, 0.9, 8)}, "defaults": {10: interval(0.85, 0.8, 0.9, 8)}},
        "test_difference": interval(-0.004, -0.010, 0.002, 8),
    }
    first, second = bench.goal_lines(summary)
    assert first == "goal 1 (warm after 3 trials >= defaults after 10): NOT MET: warm@3 0.800, defaults@10 0.850"
    assert second.startswith("goal 2 (warm's test accuracy not lower than defaults' beyond the noise): MET: "
                             "warm - defaults -0.40 pp, 95% CI [-1.00, +0.20] over 8 task(s)")
    summary["curves"]["warm"][3] = interval(0.86, 0.8, 0.9, 8)
    summary["test_difference"] = interval(-0.02, -0.03, -0.01, 8)
    first, second = bench.goal_lines(summary)
    assert ": MET: warm@3 0.860" in first and ": NOT MET: " in second
    # A budget under 10 trials cannot measure the first goal.
    summary["curves"]["defaults"] = {3: interval(0.8, 0.7, 0.9, 8)}
    assert "not measured (budget below 10)" in bench.goal_lines(summary)[0]


def test_per_task_table_averages_seeds_and_counts_the_seeds_sources(bench):
    rows = [
        {**row("a", 0, {"scratch": [0.0], "defaults": [0.5], "warm": [1.0]}, {"scratch": 0.5, "defaults": 0.6, "warm": 0.7}),
         "seeded": ["x from neighbour b (prior; distance 0.5)", "y from the portfolio (first found on b)"]},
        {**row("a", 1, {"scratch": [1.0], "defaults": [0.0], "warm": [1.0]}, {"scratch": 0.7, "defaults": 0.6, "warm": 0.9}),
         "seeded": ["x from neighbour b (prior; distance 0.4)"]},
    ]
    lines = bench.per_task_table(rows, (1,)).splitlines()
    assert lines[2] == "| a | 2 | 0.50 | 0.25 | 1.00 | 60.0% / 60.0% / 80.0% | 2 neighbour, 1 portfolio |"


def test_opening_values_queue_each_configuration_once_in_order(bench):
    values = {"a": 0.7, "b": None, "c": 0.9}
    # "a" again (a seed that is a default) is not a second trial; "d" was never run: None.
    assert bench.opening_values(["a", "b", "a", "c", "d"], values) == [0.7, None, 0.9, None]
    assert bench.opening_values([], values) == []


def test_openings_compares_autometas_own_alternating_order(bench):
    from autometa.study.warmstart import opening

    orders = bench.openings()
    defaults, seeds = ["d0", "d1", "d2"], ["s0", "s1"]
    values = {"d0": 0.6, "d1": None, "d2": 0.8, "s0": 0.7, "s1": 0.9}
    assert orders["seeds first"](defaults, seeds, values) == ["s0", "s1", "d0", "d1", "d2"]
    assert orders["two defaults first"](defaults, seeds, values) == ["d0", "d1", "s0", "s1", "d2"]
    assert orders["alternating"](defaults, seeds, values) == opening(defaults, seeds) == ["d0", "s0", "d1", "s1", "d2"]
    # The ceilings: the best value first, a trial that did not complete last.
    assert orders["defaults, best first (in hindsight)"](defaults, seeds, values) == ["d2", "d0", "d1"]
    assert orders["defaults and seeds, best first (in hindsight)"](defaults, seeds, values) == ["s1", "d2", "s0", "d0", "d1"]


def test_in_hindsight_keeps_ties_in_order_and_unknown_configurations_last(bench):
    values = {"a": 0.5, "b": 0.9, "c": 0.5, "d": None}
    assert bench.in_hindsight(["d", "a", "e", "b", "c"], values) == ["b", "a", "c", "d", "e"]


def test_ranked_by_orders_defaults_by_their_mean_elsewhere_and_counts_failures_as_zero(bench):
    defaults = {"g": "gbm", "l": "linear", "f": "finetune", "m": "mann"}
    elsewhere = [
        {"gbm": 0.2, "linear": 1.0, "finetune": None, "mann": 0.5},  # finetune did not complete: 0
        {"gbm": 0.6, "linear": 0.0, "finetune": 0.9},  # mann not run there: 0
    ]
    # means: gbm 0.4, linear 0.5, finetune 0.45, mann 0.25
    assert bench.ranked_by(defaults, elsewhere) == ["l", "f", "g", "m"]
    # Ties and an empty knowledge base keep autometa's own order.
    assert bench.ranked_by(defaults, [{"gbm": 1.0, "linear": 1.0}]) == ["g", "l", "f", "m"]
    assert bench.ranked_by(defaults, []) == ["g", "l", "f", "m"]
