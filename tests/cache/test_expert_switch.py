"""Wan2.2's two experts: the high-noise expert's cache is freed at the switch, and the planned steps
the telemetry reports are the steps some expert really runs."""

from __future__ import annotations

import pytest

from ditcache import AdaTaylorConfig, load_pipeline
from ditcache.models import REFERENCE_DIGITS_MOE


@pytest.fixture(scope="module")
def output():
    pipe = load_pipeline(REFERENCE_DIGITS_MOE)
    return pipe(["a handwritten 4"], num_inference_steps=20, seed=1, cache=AdaTaylorConfig(), progress=False)


def test_the_high_noise_expert_frees_its_cache_at_the_switch(output):
    assert output.expert_steps["transformer"] and output.expert_steps["transformer_2"]
    assert output.cache_memory_bytes["transformer"] == 0
    assert output.cache_memory_bytes["transformer_2"] > 0  # the last expert keeps its until the request ends


def test_planned_steps_are_steps_an_expert_runs_and_equal_what_ran(output):
    for branch in output.telemetry()["branches"].values():
        assert branch["planned_compute_steps"] == branch["computed_steps"]
    for expert, stats in output.cache_stats.items():
        for branch in stats.values():
            assert set(branch["computed_steps"]) <= set(output.expert_steps[expert])
