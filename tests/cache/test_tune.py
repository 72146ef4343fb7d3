"""Auto-tuning on recorded residual trajectories: budgets, placement, unreachable targets."""

import itertools
import math

import pytest
import torch

from ditcache.cache import AdaTaylorCache
from ditcache.cache.fixed_interval import fixed_interval_plan
from ditcache.cache.recorder import ResidualRecorder
from ditcache.cache.tune import (
    FORECAST_GRID,
    INTERVAL_GRID,
    WARMUP_GRID,
    PlanReplayer,
    TargetUnreachableError,
    forecast_candidates,
    interval_candidates,
    rule_candidates,
    tune,
    tune_budgets,
    tune_forecasts,
    tuned_params,
)
from ditcache.params import params_from_dict


def sigmas(n, shift=5.0):
    s = [1 - i / n for i in range(n)]
    return [shift * x / (1 + (shift - 1) * x) for x in s]


def recorded(n=30, seed=0):
    """Residuals that drift slowly mid-run and change fast at the start and end, like a trained DiT."""
    gen = torch.Generator().manual_seed(seed)
    base, turn = torch.randn(2, 16, 8, generator=gen), torch.randn(2, 16, 8, generator=gen)
    rec = ResidualRecorder(n, max_tokens=8)
    for is_cond, scale in ((True, 1.0), (False, 0.8)):
        for t in range(n):
            phase = t / (n - 1)
            r = scale * (base * (1 + phase) + turn * math.exp(-20 * phase) + turn * math.exp(-20 * (1 - phase)) * 2)
            assert rec.should_compute(is_cond)
            rec.update(r, torch.zeros_like(r), is_cond)
    return rec


def params(n=30):
    curve = [1.0] + [1.0 - 0.002 * i for i in range(n - 1)]
    return params_from_dict({"K": 4, "thresh": 0.12, "retention_ratio": 0.2,
                             "cond_mag_ratios": curve, "uncond_mag_ratios": curve, "sigmas": sigmas(n)})


def test_recorder_keeps_a_seeded_token_subset():
    rec = recorded()
    trajs = rec.trajectories(True)
    assert len(trajs) == 1 and trajs[0].shape == (30, 2, 8, 8)


@pytest.mark.parametrize("target", [1.5, 2.0, 2.5])
def test_tuned_plan_meets_the_target_and_beats_the_hand_rule(target):
    rec = recorded()
    replayer = PlanReplayer({c: rec.trajectories(c) for c in (True, False)}, sigmas(30), guidance_scale=4.0)
    result = tune(replayer, params(), target_speedup=target)
    assert abs(result.predicted_speedup - target) <= 0.1 * target
    # no threshold-rule plan of the same budget predicts a smaller error than the chosen one
    chosen = result.chosen
    rules = rule_candidates(replayer, params(), round(30 / target), 0.1, None)
    assert rules and chosen.predicted_error <= min(c.predicted_error for c in rules) + 1e-12
    data = tuned_params(params(), result, 30, {"target_speedup": target})
    cache = AdaTaylorCache(params=params_from_dict(data), num_inference_steps=30)
    assert cache.planned_compute_steps(True) == chosen.compute_steps[True]


def test_placement_puts_computes_where_the_residual_moves():
    rec = recorded()
    replayer = PlanReplayer({c: rec.trajectories(c) for c in (True, False)}, sigmas(30), guidance_scale=4.0)
    result = tune(replayer, params(), target_speedup=3.0)
    plan = result.chosen.compute_steps[True]
    early = sum(1 for s in plan if s < 5)
    middle = sum(1 for s in plan if 10 <= s < 20)
    assert early >= middle  # the fast-changing start gets more computes than the smooth middle


def test_unreachable_targets_are_refused():
    rec = recorded(n=4)
    replayer = PlanReplayer({c: rec.trajectories(c) for c in (True, False)}, sigmas(4), guidance_scale=4.0)
    with pytest.raises(TargetUnreachableError, match="few-step"):
        tune(replayer, params(4), target_speedup=3.0)
    with pytest.raises(TargetUnreachableError, match="cannot help"):
        tune(replayer, params(4), max_error=1e-9)


def _replayer(n=30, **kw):
    rec = recorded(n)
    return PlanReplayer({c: rec.trajectories(c) for c in (True, False)}, sigmas(n), guidance_scale=4.0, **kw)


@pytest.mark.parametrize("target", [2.0, 3.0, 5.0])
def test_tuned_plan_is_never_worse_than_the_best_uniform_interval_plan(target):
    """TaylorSeer's fixed-interval plans are candidates: the chosen plan predicts at most their error."""
    replayer = _replayer()
    budget = round(30 / target)
    intervals = interval_candidates(replayer, budget, 0.1)
    assert intervals and all(c.method == "interval" for c in intervals)
    plans = {tuple(c.compute_steps[True]) for c in intervals}
    for interval, warmup in itertools.product(INTERVAL_GRID, WARMUP_GRID):
        exact = fixed_interval_plan(30, interval, warmup)  # what the taylorseer_interval cache runs
        if budget * 0.9 <= len(exact) <= budget:
            assert tuple(exact) in plans
    for cand in intervals:
        steps = cand.compute_steps[True]
        assert len(steps) <= budget
        plain = fixed_interval_plan(30, cand.settings["interval"], cand.settings["warmup"])
        assert steps == (sorted({*plain, 29}) if cand.settings["last_step"] else plain)
    result = tune(replayer, params(), target_speedup=target)
    assert result.chosen.predicted_error <= min(c.predicted_error for c in intervals) + 1e-12


def test_tune_budgets_agrees_with_tune():
    replayer = _replayer()
    many = tune_budgets(replayer, params(), [15, 10, 6])
    for budget, target in ((15, 2.0), (10, 3.0), (6, 5.0)):
        one = tune(replayer, params(), target_speedup=target)
        assert many[budget].chosen.predicted_error == pytest.approx(one.chosen.predicted_error)
        assert many[budget].chosen.passes([True, False]) <= 2 * budget


def test_segment_starts_are_computed_and_restart_the_forecast():
    """A Wan2.2 expert switch: the replay starts a fresh cache there and every candidate computes it."""
    plain, split = _replayer(), _replayer(segment_starts=[12])
    result = tune(split, params(), target_speedup=3.0)
    assert 12 in result.chosen.compute_steps[True] and 12 in result.chosen.compute_steps[False]
    for cand in interval_candidates(split, 10, 0.1):
        assert {0, 12} <= set(cand.compute_steps[True])
    plan = [0, 4, 8, 12, 16, 20, 24, 29]
    # the same plan, replayed with a fresh cache at step 12: the forecast after 12 uses no older steps
    assert split.branch_error(True, plan) != pytest.approx(plain.branch_error(True, plan))
    data = tuned_params(params(), result, 30, {"target_speedup": 3.0})
    assert 12 in data["compute_steps"]["cond"]  # whatever the method, the plan is written as its steps


def test_placement_is_one_plan_for_both_branches_and_local_search_only_helps():
    from ditcache.cache.tune import local_search, placement_candidates

    rec = recorded()
    replayer = PlanReplayer({c: rec.trajectories(c) for c in (True, False)}, sigmas(30), guidance_scale=4.0)
    placed = placement_candidates(replayer, [12, 6])
    for budget, cand in placed.items():
        # a split plan mixes a fresh branch with a stale one in the CFG combine: never proposed
        assert cand.compute_steps[True] == cand.compute_steps[False]
        assert len(cand.compute_steps[True]) == budget and cand.compute_steps[True][0] == 0

    def joint(plan):
        return replayer.error({True: plan, False: plan})

    start = [0, 1, 2, 3, 29]
    polished = local_search(joint, 30, start, {0, 29})
    assert len(polished) == len(start) and {0, 29} <= set(polished)  # fixed steps stay
    assert joint(polished) <= joint(start)
    free = local_search(joint, 30, [0, 1, 2, 3, 27], {0})
    assert max(free) <= 29 and joint(free) <= joint([0, 1, 2, 3, 27])  # the last step is a place to move to


def test_forecast_candidates_are_the_grid_entries_matching_what_is_given():
    assert forecast_candidates(None, None) == list(FORECAST_GRID)
    assert forecast_candidates(1, None) == [(1, 2), (1, 3), (1, 6)]
    assert forecast_candidates(None, 6) == [(1, 6), (2, 6)]
    assert forecast_candidates(1, 2) == [(1, 2)]
    assert forecast_candidates(0, None) == [(0, 2)]
    assert forecast_candidates(3, None) == [(3, 2)]  # outside the grid: the pair as given
    assert forecast_candidates(3, 4) == [(3, 4)]


def test_each_forecast_is_tuned_and_its_params_record_it():
    rec = recorded()
    trajectories = {c: rec.trajectories(c) for c in (True, False)}

    def replayer_for(n, t):
        return PlanReplayer(trajectories, sigmas(30), 4.0, n_derivatives=n, taylor_threshold=t)

    results = tune_forecasts(replayer_for, params(), FORECAST_GRID, target_speedup=2.5)
    assert [(r.forecast["n_derivatives"], r.forecast["taylor_threshold"]) for r in results] == list(FORECAST_GRID)
    for (n, t), result in zip(FORECAST_GRID, results):
        alone = tune(replayer_for(n, t), params(), target_speedup=2.5)
        assert result.chosen.compute_steps == alone.chosen.compute_steps
        data = tuned_params(params(), result, 30, {"target_speedup": 2.5})
        assert data["forecast"] == {"n_derivatives": n, "taylor_threshold": t}
        cache = AdaTaylorCache(params=params_from_dict(data), num_inference_steps=30)
        assert (cache.n_derivatives, cache.taylor_threshold) == (n, t)
    with pytest.raises(TargetUnreachableError):
        tune_forecasts(replayer_for, params(), FORECAST_GRID, target_speedup=40.0)  # 1 step per branch


def test_a_rule_winner_is_written_as_the_steps_it_was_judged_on():
    """The params file runs the replayed plan at the tuned step count; its rule settings serve others."""
    replayer = _replayer()
    result = tune(replayer, params(), target_speedup=3.0, place_steps=False, intervals=False)
    assert result.chosen.method == "rule"
    data = tuned_params(params(), result, 30, {"target_speedup": 3.0})
    cache = AdaTaylorCache(params=params_from_dict(data), num_inference_steps=30)
    assert cache.plan_source == "explicit"
    assert [cache.planned_compute_steps(c) for c in (True, False)] == [result.chosen.compute_steps[c] for c in (True, False)]
    assert data["thresh"] == result.chosen.settings["thresh"]
    assert AdaTaylorCache(params=params_from_dict(data), num_inference_steps=20).plan_source == "rule"


def _whole_run_error(replayer, is_cond, plan):
    """The replay without memory: one real cache driven through every step of each segment."""
    planned, starts = set(plan) | set(replayer.segment_starts), set(replayer.segment_starts)
    flat, total = [1.0] * replayer.num_steps, 0.0
    for traj in replayer.trajectories[is_cond]:
        zero = torch.zeros_like(traj[0])
        for step in range(replayer.num_steps):
            if step in starts:
                cache = AdaTaylorCache(
                    cond_mag_ratios=flat, uncond_mag_ratios=flat, K=0, thresh=0.0, retention_ratio=0.0,
                    num_inference_steps=replayer.num_steps, n_derivatives=replayer.n_derivatives,
                    taylor_threshold=replayer.taylor_threshold, taylor_form=replayer.taylor_form, init_step=step,
                )  # fmt: skip
            cache.should_compute(is_cond)
            if step in planned:
                cache.update(traj[step], zero, is_cond)
            else:
                total += replayer.step_weight[step] * float((cache.approximate(zero, is_cond) - traj[step]).pow(2).mean().sqrt())
    return total / len(replayer.trajectories[is_cond])


@pytest.mark.parametrize("order,threshold,form", [(0, 2, "taylor"), (1, 3, "taylor"), (2, 6, "taylor"), (2, 2, "newton")])
def test_the_remembered_replay_equals_a_whole_run_replay_bit_for_bit(order, threshold, form):
    """The replay remembers each run of skipped steps; any plan, asked in any order, must predict
    exactly what one cache driven through the whole run predicts."""
    gen = torch.Generator().manual_seed(order * 10 + threshold)
    replayer = _replayer(n_derivatives=order, taylor_threshold=threshold, taylor_form=form, segment_starts=[17])
    for _ in range(40):
        k = int(torch.randint(2, 14, (1,), generator=gen))
        plan = sorted({0, *torch.randperm(30, generator=gen)[:k].tolist()})
        for is_cond in (True, False):
            assert replayer.branch_error(is_cond, plan) == _whole_run_error(replayer, is_cond, plan)
