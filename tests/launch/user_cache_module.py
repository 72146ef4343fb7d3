"""Source of a user's cache module, as a test writes it to a file: a cache registered by its own
name, with one option, that neither ditcache nor the CLI know about."""

SOURCE = '''
from dataclasses import dataclass
from typing import ClassVar

from ditcache.cache import BaseFeatureCache, CacheConfig, branch_name, branch_of, register_cache
from ditcache.cache.base import BranchStats


class EveryNth(BaseFeatureCache):
    """Computes every ``every``-th step of a branch and reuses the last residual in between."""

    uses_step_context = True

    def __init__(self, every: int = 2, init_step: int = 0) -> None:
        self.every, self.init_step = every, init_step
        self.reset()

    def reset(self) -> None:
        self._step, self._residual, self._stats = {}, {}, {}

    def should_compute(self, ctx) -> bool:
        c = branch_of(ctx)
        step = self._step.get(c, self.init_step - 1) + 1
        self._step[c] = step
        compute = step % self.every == 0 or c not in self._residual
        stats = self._stats.setdefault(c, BranchStats())
        (stats.computed_steps if compute else stats.skipped_steps).append(step)
        return compute

    def update(self, output, ori_input, ctx) -> None:
        self._residual[branch_of(ctx)] = output - ori_input

    def approximate(self, input, ctx):
        return input + self._residual[branch_of(ctx)]

    def current_step(self, is_cond) -> int:
        return self._step.get(branch_of(is_cond), self.init_step - 1)

    def stats(self) -> dict:
        return {branch_name(c): s.as_dict() for c, s in sorted(self._stats.items(), reverse=True)}


@register_cache
@dataclass(frozen=True)
class EveryNthConfig(CacheConfig):
    name: ClassVar[str] = "every_nth"
    cache_class: ClassVar[type] = EveryNth
    every: int = 2
'''
