"""AdaTaylorCache storage options: ``cache_dtype`` (fp32 or the model's dtype) and ``offload="cpu"``."""

from __future__ import annotations

import pytest
import torch

from ditcache.cache import AdaTaylorCache, AdaTaylorConfig
from ditcache.errors import CacheConfigError

CURVE = dict(cond_mag_ratios=[1.0] * 12, uncond_mag_ratios=[1.0] * 12, K=3, thresh=0.5, retention_ratio=0.2)


def run(cache: AdaTaylorCache, dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list[dict]]:
    """A 12-step cond branch on a smooth residual; the outputs and the device bytes after each decision."""
    generator = torch.Generator().manual_seed(0)
    base, slope = torch.randn(2, 64, generator=generator), torch.randn(2, 64, generator=generator)
    outputs, held = [], []
    for step in range(12):
        x = torch.randn(2, 64, generator=generator).to(dtype)
        compute = cache.should_compute(True)
        held.append({"compute": compute, "device_bytes": cache.branch_device_bytes(True)})
        if compute:
            out = (x.float() + base + slope * step + 0.1 * step**2).to(dtype)
            cache.update(out, x, True)
        else:
            out = cache.approximate(x, True)
        outputs.append(out)
    return outputs, held


def test_offload_gives_the_same_output_and_holds_nothing_on_the_device_while_the_stack_runs():
    plain, _ = run(AdaTaylorCache(num_inference_steps=12, n_derivatives=2, **CURVE))
    offloaded_cache = AdaTaylorCache(num_inference_steps=12, n_derivatives=2, offload="cpu", **CURVE)
    offloaded, held = run(offloaded_cache)
    assert all(torch.equal(a, b) for a, b in zip(plain, offloaded))
    assert any(not h["compute"] for h in held)
    for h in held:
        if h["compute"]:
            assert h["device_bytes"] == 0, "a computed step runs the stack with the residuals off the device"
        else:
            assert h["device_bytes"] > 0, "a skipped step has them back"
    stats = offloaded_cache.stats()["cond"]
    assert stats["stored_bytes"] == 3 * 2 * 64 * 4  # residual + 2 differences, fp32


def test_model_dtype_storage_halves_memory_under_bf16_and_stays_close():
    fp32_cache = AdaTaylorCache(num_inference_steps=12, n_derivatives=1, **CURVE)
    bf16_cache = AdaTaylorCache(num_inference_steps=12, n_derivatives=1, cache_dtype="model", **CURVE)
    reference, _ = run(fp32_cache, torch.bfloat16)
    stored, _ = run(bf16_cache, torch.bfloat16)
    assert bf16_cache.stats()["cond"]["stored_bytes"] * 2 == fp32_cache.stats()["cond"]["stored_bytes"]
    assert all(d.dtype == torch.bfloat16 for d in bf16_cache._branches[True].differences)
    for a, b in zip(reference, stored):
        torch.testing.assert_close(a.float(), b.float(), atol=0.1, rtol=0.02)


def test_fp32_model_storage_is_unchanged_by_model_dtype():
    a, _ = run(AdaTaylorCache(num_inference_steps=12, **CURVE))
    b, _ = run(AdaTaylorCache(num_inference_steps=12, cache_dtype="model", **CURVE))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("options, message", [({"cache_dtype": "fp16"}, "cache_dtype"), ({"offload": "disk"}, "offload")])
def test_bad_storage_options_are_refused_in_the_config(options, message):
    with pytest.raises(CacheConfigError, match=message):
        AdaTaylorConfig(model_type="Reference-Digits", **options)


def test_storage_options_run_through_the_pipeline():
    from ditcache import load_pipeline
    from ditcache.models import REFERENCE_DIGITS

    pipe = load_pipeline(REFERENCE_DIGITS)
    common = dict(prompt=["a handwritten 3", "a handwritten 7"], num_inference_steps=12, seed=3, progress=False)
    plain = pipe(**common, cache=AdaTaylorConfig())
    stored = pipe(**common, cache=AdaTaylorConfig(cache_dtype="model", offload="cpu"))
    assert torch.equal(plain.frames, stored.frames)  # an fp32 model: same storage dtype, same numbers
