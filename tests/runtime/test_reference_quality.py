"""The bundled reference model with its shipped params: cached vs uncached quality, and curve shape.

Floors sit under what was measured (50 steps, shift 5, CFG 4, one prompt per digit, seed 7, one
thread, diffusers' UniPC sampler with the params recalibrated on its grid): base order 1 37.8 dB vs
order 0 33.1 dB at the same 44/100 block passes; MoE 38.5 vs 34.1 dB at 46/100. (On the earlier
hand-written Euler grid and its params: 37.9 vs 34.1 and 37.8 vs 34.1 dB.)
"""

import pytest
import torch

from ditcache.cache import AdaTaylorConfig
from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE
from ditcache.params import load_params
from ditcache.families import load_pipeline
from ditcache.runtime.reference import load_digits, train_digit_classifier

PROMPTS = [f"a handwritten {k}" for k in range(10)]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a.double() - b.double()).pow(2).mean()))


@pytest.fixture(scope="module")
def classifier():
    torch.set_num_threads(1)
    images, labels = load_digits()
    return train_digit_classifier(images, labels, epochs=2)


@pytest.mark.parametrize("model_dir,floor", [(REFERENCE_DIGITS, 36.0), (REFERENCE_DIGITS_MOE, 35.0)])
def test_cached_samples_stay_close_to_uncached_and_readable(model_dir, floor, classifier):
    torch.set_num_threads(1)
    pipe = load_pipeline(model_dir)
    reference = pipe(prompt=PROMPTS, seed=7, enable_ada_taylor_cache=False, progress=False)
    order1 = pipe(prompt=PROMPTS, seed=7, cache=AdaTaylorConfig(n_derivatives=1), progress=False)
    order0 = pipe(prompt=PROMPTS, seed=7, cache=AdaTaylorConfig(n_derivatives=0), progress=False)
    passes = order1.total_stack_passes()
    assert sum(passes.values()) <= 0.5 * 100, "the shipped params must skip at least half the block passes"
    p1, p0 = psnr(order1.frames, reference.frames), psnr(order0.frames, reference.frames)
    print(f"{model_dir.name}: order 1 {p1:.2f} dB, order 0 {p0:.2f} dB, passes {passes}")
    assert p1 >= floor
    assert p1 >= p0 + 2.0, "the Taylor forecast must beat plain residual reuse on the same plan"
    labels = torch.arange(10)
    for out in (reference, order1):
        predicted = classifier.predict(out.frames[:, :, 0] * 2 - 1)
        assert (predicted == labels).float().mean() >= 0.8


def test_reference_curve_has_the_shape_of_published_wan_curves():
    """Near 1 for most of the run, falling over the last steps (like Wan2.1-T2V-1.3B's)."""
    for name in ("Reference-Digits", "Reference-Digits-MoE"):
        p = load_params(name)
        assert p.num_inference_steps == 50 and p.sigma_shift == 5.0 and p.sigmas is not None
        for curve in (p.cond_mag_ratios, p.uncond_mag_ratios):
            middle = curve[1:40]
            assert max(abs(1 - r) for r in middle) < 0.05
            assert sum(curve[45:]) / 5 < 0.95 < sum(middle) / len(middle)
            assert curve[-1] == min(curve)
