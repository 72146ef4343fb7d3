"""Auto-tune on the bundled reference model (quick settings): targets met, better than the hand rule."""

import pytest
import torch

from ditcache.cache import AdaTaylorCache
from ditcache.cache.recorder import ResidualRecorder
from ditcache.cache.schedule import resample_by_sigma
from ditcache.cache.tune import PlanReplayer, thresh_for_budget, tune, tuned_params
from ditcache.models import REFERENCE_DIGITS
from ditcache.params import load_params, params_from_dict
from ditcache.families import load_pipeline
from ditcache.runtime.scheduler import wan_schedule

STEPS, SHIFT, GUIDANCE = 30, 5.0, 4.0
EVAL = [f"a handwritten {k}" for k in range(10)]


def psnr(a, b) -> float:
    return float(10 * torch.log10(1 / (a.double() - b.double()).pow(2).mean()))


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    pipe = load_pipeline(REFERENCE_DIGITS)
    common = dict(num_inference_steps=STEPS, sigma_shift=SHIFT, guidance_scale=GUIDANCE, progress=False)
    recorder = ResidualRecorder(STEPS)
    pipe(prompt=EVAL[:5], seed=100, cache=recorder, **common)  # other seeds than the evaluation
    sigmas = wan_schedule(STEPS, SHIFT).sigmas[:-1].tolist()
    replayer = PlanReplayer({c: recorder.trajectories(c) for c in (True, False)}, sigmas, GUIDANCE)
    reference = pipe(prompt=EVAL, seed=7, enable_ada_taylor_cache=False, **common).frames
    return pipe, common, sigmas, replayer, reference


@pytest.mark.parametrize("target", [1.5, 2.0, 2.5])
def test_tuned_plan_meets_target_and_beats_hand_rule(setup, target):
    pipe, common, sigmas, replayer, reference = setup
    params = load_params("Reference-Digits")
    result = tune(replayer, params, target_speedup=target, sigmas=sigmas)
    tuned = params_from_dict(tuned_params(params, result, STEPS, {"target_speedup": target}))
    out = pipe(prompt=EVAL, seed=7, cache=AdaTaylorCache(params=tuned, num_inference_steps=STEPS,
                                                                 sigmas=sigmas), **common)  # fmt: skip
    passes = sum(out.total_stack_passes().values())
    achieved = 2 * STEPS / passes
    assert abs(achieved - target) <= 0.1 * target

    curve = resample_by_sigma(params.cond_mag_ratios, params.sigmas, sigmas)
    hand_thresh = thresh_for_budget(curve, STEPS, passes // 2, 4, 0.2)
    hand = params_from_dict({**tuned_params(params, result, STEPS, {}), "K": 4, "retention_ratio": 0.2,
                             "thresh": hand_thresh, "compute_steps": None})  # fmt: skip
    hand_out = pipe(prompt=EVAL, seed=7, cache=AdaTaylorCache(params=hand, num_inference_steps=STEPS,
                                                                      sigmas=sigmas), **common)  # fmt: skip
    hand_passes = sum(hand_out.total_stack_passes().values())
    assert abs(hand_passes - passes) <= 0.1 * passes, "compare at (nearly) the same speed"
    tuned_db, hand_db = psnr(out.frames, reference), psnr(hand_out.frames, reference)
    print(f"{target}x: tuned {tuned_db:.2f} dB ({passes} passes), hand {hand_db:.2f} dB ({hand_passes} passes)")
    assert tuned_db > hand_db
