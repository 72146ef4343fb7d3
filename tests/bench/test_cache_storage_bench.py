"""The cache-storage benchmark (bench/cache_storage.py) at a tiny size: its JSON document, and that the
two storage dtypes ran the same plan (same block passes, same computed steps) at half the bytes."""

from __future__ import annotations

import json

import pytest
import torch

from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE

from bench import cache_storage

MODELS = [REFERENCE_DIGITS, REFERENCE_DIGITS_MOE]
STEPS, SAMPLES = 8, 2
ROW_KEYS = {
    "model", "target_speedup", "order", "taylor_threshold", "K", "thresh", "retention_ratio",
    "planned_block_pass_speedup", "plan_matches_run", "computed_steps", "block_passes", "block_passes_equal",
    "block_pass_speedup", "psnr_mean", "psnr_pooled", "psnr_per_sample", "delta_db_mean", "delta_db_ci95",
    "delta_db_min", "delta_db_max", "samples_identical", "cache_bytes_per_branch", "cache_memory_bytes",
    "cache_bytes_ratio",
}  # fmt: skip
MODEL_KEYS = {
    "model_type", "transformer_dtypes", "pipeline_settings", "steps", "sigmas", "expert_steps", "params",
    "uncached_bf16_vs_fp32_psnr_mean", "uncached_bf16_vs_fp32_psnr_pooled", "plans",
}  # fmt: skip


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> dict:
    """The benchmark's core at a tiny size, written the way the script writes it and read back."""
    missing = [m.name for m in MODELS if not (m / "model_index.json").is_file()]
    if missing:
        pytest.skip(f"bundled reference models not present: {missing}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = cache_storage.run_benchmark(
            MODELS, samples=SAMPLES, steps=STEPS, screen_samples=SAMPLES, command="test", log=lambda _: None
        )
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("cache_storage") / "results" / "cache_storage.json"
    cache_storage.write_result(result, path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    return json.loads(path.read_text())


def test_document_schema(document):
    assert {"what", "command", "settings", "versions", "models", "rows", "wall_time_s"} <= set(document)
    assert document["command"] == "test"
    assert {"torch", "diffusers"} <= set(document["versions"])
    settings = document["settings"]
    assert settings["model_dtype"] == "bfloat16"
    assert settings["samples"] == SAMPLES and settings["steps"] == STEPS
    assert settings["eval_seed"] == cache_storage.EVAL_SEED
    assert settings["storage_dtypes"] == ["float32", "model"]
    assert set(document["models"]) == {m.name for m in MODELS}
    for context in document["models"].values():
        assert MODEL_KEYS <= set(context)
        assert context["steps"] == STEPS and len(context["sigmas"]) == STEPS
        assert set(context["transformer_dtypes"].values()) == {"bfloat16"}
        assert set(context["plans"]) == {f"{t:g}x" for t in settings["targets"]}
    expected = {(m.name, t, o) for m in MODELS for t in settings["targets"] for o in settings["orders"]}
    assert {(r["model"], r["target_speedup"], r["order"]) for r in document["rows"]} == expected
    for row in document["rows"]:
        assert ROW_KEYS <= set(row)
        for per_dtype in ("block_passes", "psnr_mean", "psnr_pooled", "psnr_per_sample", "cache_bytes_per_branch",
                          "cache_memory_bytes"):  # fmt: skip
            assert set(row[per_dtype]) == {"float32", "model"}, per_dtype
        assert all(len(v) == SAMPLES for v in row["psnr_per_sample"].values())
        low, high = row["delta_db_ci95"]
        assert low <= row["delta_db_mean"] <= high
        assert row["delta_db_min"] <= row["delta_db_mean"] <= row["delta_db_max"]


def test_storage_dtypes_run_the_same_plan(document):
    for row in document["rows"]:
        passes = row["block_passes"]
        assert passes["float32"] == passes["model"]
        assert row["block_passes_equal"] and row["plan_matches_run"]
        plan = document["models"][row["model"]]["plans"][f"{row['target_speedup']:g}x"]
        assert row["computed_steps"] == plan["compute_steps"]
        assert sum(passes["float32"].values()) == sum(len(s) for s in plan["compute_steps"].values())
        assert row["block_pass_speedup"] == pytest.approx(2 * STEPS / sum(passes["float32"].values()), abs=1e-4)


def test_bf16_storage_halves_the_cache(document):
    for row in document["rows"]:
        fp32, bf16 = row["cache_bytes_per_branch"]["float32"], row["cache_bytes_per_branch"]["model"]
        assert set(fp32) == set(bf16) == {"cond", "uncond"}
        assert all(fp32[b] > 0 and bf16[b] * 2 == fp32[b] for b in fp32)
        assert row["cache_bytes_ratio"] == 0.5


def test_paired_bootstrap_ci():
    constant = torch.full((7,), 0.25, dtype=torch.float64)
    assert cache_storage.paired_bootstrap_ci(constant) == [0.25, 0.25]
    spread = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    low, high = cache_storage.paired_bootstrap_ci(spread)
    assert -1.0 <= low < float(spread.mean()) < high <= 2.0
    assert cache_storage.paired_bootstrap_ci(spread) == [low, high]  # fixed seed: reproducible
