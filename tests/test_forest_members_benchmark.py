"""benchmarks/forest_members.py: each member fitted as its default trial, each ensemble chosen on
the validation rows (so never below its best member there), the same figures under the same seed."""

from __future__ import annotations

import pytest
from helpers import benchmark_script, write_blobs_csv

from autometa.config import search_choices
from autometa.data.loading import load_dataset
from autometa.plugins import get_registry


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_script("forest_members.py", "forest_members_benchmark")


def test_split_scores_of_members_and_ensembles(bench, tmp_path):
    dataset = load_dataset(write_blobs_csv(tmp_path / "blobs.csv", per_class=40, shift=1.5), "y")
    registry = get_registry()
    choices = search_choices(registry, "standard", dataset.modalities)
    scores = bench.split_scores(dataset, registry, choices, seed=0)
    assert list(scores) == [*bench.MEMBERS, *bench.ENSEMBLES]
    for ensemble, members in bench.ENSEMBLES.items():
        # Caruana's selection keeps its best round, the first of which is the best single member.
        assert scores[ensemble]["validation"] >= max(scores[m]["validation"] for m in members)
    assert all(1 / 3 < s["test"] <= 1 for s in scores.values())  # the classes are apart: above chance
    assert bench.split_scores(dataset, registry, choices, seed=0) == scores
