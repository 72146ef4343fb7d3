"""``results.json`` of a ``ray-generate`` job: every request's status, rewritten atomically on each change.

A job that is killed midway (the driver, the cluster, the machine) leaves the record as of its last
change, never half a file (temp file + ``os.replace``), so ``--resume`` can tell what is done. The
record, version 1::

    {
      "version": 1,
      "status": "running" | "done" | "failed" | "error",  # failed: some request failed; error: the job stopped
      "error": null | "<one line>",                       # why the job stopped (status "error")
      "settings": {"<option>": "<value>", ...},           # what shapes the outputs; --resume needs the same
      "layout": {"replicas": 2, "ranks_per_replica": 2, "cfg": 2, "sp": 1, "ring": 1},
      "model_loads": {"<global rank>": 1, ...},           # models loaded per rank, over every (re)start
      "replica_starts": {"<replica>": 1, ...},            # 2+: the replica was restarted after a failure
      "requests": [{
        "index": 0, "prompt": "...", "output": "/abs/000-prompt.png",
        "status": "pending" | "running" | "done" | "failed",
        "resumed": false,                                 # true: done by an earlier run, skipped by --resume
        "error": null | "<the last failed attempt's message>",
        "attempts": [{"replica": 0, "status": "running" | "done" | "failed", "error": null | "..."}],
        "result": null | {"path": ..., "summary": ..., "telemetry": ..., "wall_time_s": ..., ...}
      }, ...]
    }
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ditcache.errors import ParamsError
from ditcache.launch.ray_cluster import LoadReport
from ditcache.launch.ray_dispatch import Request, RequestResult
from ditcache.runtime.io import atomic_target

VERSION = 1
RESULTS_FILE = "results.json"


@dataclass
class Attempt:
    """One try of a request on one replica."""

    replica: int
    status: str = "running"
    error: str | None = None


@dataclass
class RequestRecord:
    index: int
    prompt: str
    output: str
    status: str = "pending"
    resumed: bool = False
    error: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    result: dict[str, Any] | None = None


def done_before(path: Path, settings: dict[str, str], requests: Sequence[Request]) -> dict[int, dict[str, Any]]:
    """The records of ``requests`` that an earlier run recorded done in ``path`` and whose output file
    still exists (index -> record). A missing record means nothing was done; a record of other
    settings, or one that cannot be read, is refused rather than mixed with this run."""
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
        previous = {r["index"]: r for r in record["requests"]}
        recorded_settings = record["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ParamsError(f"--resume: cannot read {path} ({type(exc).__name__}: {exc}); remove it to start over") from None
    if recorded_settings != settings:
        changed = sorted(k for k in settings.keys() | recorded_settings.keys() if settings.get(k) != recorded_settings.get(k))
        raise ParamsError(f"--resume: {path} was written with other settings ({', '.join(changed)}); use another --output-dir")
    done = {}
    for i, request in enumerate(requests):
        old = previous.get(i)
        output = str(request.args.output)
        if old and old["status"] == "done" and old["prompt"] == request.label and old["output"] == output:
            if Path(output).is_file():
                done[i] = old
    return done


class JobRecord:
    """The job's ``results.json``; also the dispatcher's listener, so every change is saved as it happens.

    ``progress`` (a tqdm bar) advances once per request that is settled (done, or failed for good) and
    prints one line per finished request and per failed attempt.
    """

    def __init__(
        self,
        path: Path,
        requests: Sequence[Request],
        *,
        settings: dict[str, str],
        layout: dict[str, int],
        done: dict[int, dict[str, Any]],
        progress: tqdm | None = None,
    ) -> None:
        self.path = path
        self.settings = settings
        self.layout = layout
        self.progress = progress
        self.status = "running"
        self.error: str | None = None
        # (global rank, pid) -> models that process had loaded when it became ready; each request's
        # result also carries its ranks' counts, which show that serving loaded nothing more.
        self.loads: dict[tuple[int, int], int] = {}
        self.replica_starts: dict[int, int] = {}
        self.results: dict[int, RequestResult] = {}  # finished by this run, frames and all
        self.requests = [RequestRecord(i, r.label, str(r.args.output)) for i, r in enumerate(requests)]
        for i, old in done.items():
            self.requests[i] = RequestRecord(
                i, old["prompt"], old["output"], "done", True, None,
                [Attempt(**a) for a in old["attempts"]], old["result"],
            )
        self.save()

    def todo(self) -> list[int]:
        """Indices of the requests this run has to do."""
        return [r.index for r in self.requests if r.status != "done"]

    def model_loads(self) -> dict[int, int]:
        """Models loaded per global rank in this run, summed over the rank's processes."""
        totals: dict[int, int] = {}
        for (rank, _), count in self.loads.items():
            totals[rank] = totals.get(rank, 0) + count
        return dict(sorted(totals.items()))

    def loaded(self, replica: int, reports: list[LoadReport]) -> None:
        self.replica_starts[replica] = self.replica_starts.get(replica, 0) + 1
        for report in reports:
            self.loads[(report.rank, report.pid)] = report.model_loads
        self.save()

    def started(self, index: int, replica: int) -> None:
        record = self.requests[index]
        record.status = "running"
        record.attempts.append(Attempt(replica))
        self.save()

    def attempt_failed(self, index: int, replica: int, error: str, retry: bool) -> None:
        record = self.requests[index]
        record.attempts[-1].status, record.attempts[-1].error = "failed", error
        record.status, record.error = ("pending" if retry else "failed"), error
        self._report(f"[{index:03d}] attempt {len(record.attempts)} failed{', retrying' if retry else ''}: {error}",
                     settled=not retry)
        self.save()

    def finished(self, result: RequestResult) -> None:
        record = self.requests[result.index]
        record.attempts[-1].status = "done"
        record.status, record.result = "done", result.to_json()
        self.results[result.index] = result
        self._report(f"[{result.index:03d}] {result.label!r}: {result.output.summary()} -> {result.path}", settled=True)
        self.save()

    def _report(self, line: str, settled: bool) -> None:
        if self.progress is not None:
            self.progress.write(line)
            self.progress.update(int(settled))

    def close(self, error: str | None = None) -> None:
        """The job's end: ``error`` says why it stopped early; otherwise done or failed by the requests."""
        self.error = error
        if error is not None:
            self.status = "error"
        else:
            self.status = "failed" if any(r.status == "failed" for r in self.requests) else "done"
        self.save()

    def failures(self) -> list[RequestRecord]:
        return [r for r in self.requests if r.status == "failed"]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "status": self.status,
            "error": self.error,
            "settings": self.settings,
            "layout": self.layout,
            "model_loads": {str(r): n for r, n in self.model_loads().items()},
            "replica_starts": {str(r): n for r, n in sorted(self.replica_starts.items())},
            "requests": [asdict(r) for r in self.requests],
        }

    def save(self) -> None:
        with atomic_target(self.path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1))
