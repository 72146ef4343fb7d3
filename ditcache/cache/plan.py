"""The plan of a whole run before it runs: which steps each expert computes, per branch.

Built through the same ``config.build(num_inference_steps, sigmas, init_step)`` call a pipeline
makes for each expert (``init_step`` = the expert's first step), then cut to the steps that expert
runs, so a printed plan is the run's plan by construction: a two-expert run computes the switch
step even where the single-expert plan would skip it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ditcache.cache.context import branch_name
from ditcache.cache.registry import CacheConfig
from ditcache.errors import CacheConfigError


def plan_run(
    config: CacheConfig, experts: Sequence[str], sigmas: Sequence[float] | None, branches: Sequence[bool] = (True, False)
) -> dict[str, dict[str, list[int]]]:
    """expert -> branch name -> the steps that expert computes, for a run whose step ``i`` is run by
    ``experts[i]`` (one name repeated for a single-model run)."""
    plan: dict[str, dict[str, list[int]]] = {}
    for name in dict.fromkeys(experts):
        first = experts.index(name)
        cache = config.build(len(experts), sigmas, 0 if config.spans_experts else first)
        planned = getattr(cache, "planned_compute_steps", None)
        if planned is None:
            raise CacheConfigError(f"cache {config.name!r} decides from each step's input: it has no plan before the run")
        mine = {i for i, expert in enumerate(experts) if expert == name}
        plan[name] = {branch_name(c): [s for s in planned(c) if s in mine] for c in branches}
    return plan
