"""A benchmark's progress lines, each stamped with the seconds since the benchmark started."""

from __future__ import annotations

import time


class ElapsedLog:
    """``log("...")`` prints ``[  12.3s] ...`` at once (flushed, so a long run shows where it is)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def __call__(self, message: str) -> None:
        print(f"[{self.seconds():6.1f}s] {message}", flush=True)
