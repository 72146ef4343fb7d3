"""Fault matrix: every way a launch is known to go wrong, run for real, with what each rank said.

Each case starts the real entry points as separate processes (no monkeypatching, nothing in this
process): two gloo ranks of ``launch/generate.py`` (each rank its own ``python`` with the torchrun
environment ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set, so one rank can be given
other arguments or environment, or killed, or never started), ``ditcache generate``/``calibrate``/
``list`` on one process, and ``ditcache ray-generate`` against no cluster or a private local one.
The bundled reference model, 4 steps. Every process gets a hard timeout and runs in its own session
(its process group is killed on the timeout).

Per case it records the expected behaviour, what was observed (every rank's exit code, the first
error line of its stderr, whether its stderr held a traceback, whether an output file was written),
the time to fail (wall seconds from the fault, i.e. the launch, or the SIGKILL for the kill cases,
to the last rank's exit) and pass/fail against the expectation, prints a markdown table and writes
``bench/results/fault_matrix.json`` atomically. The expectations follow the tests that provoke the same
faults (tests/parallel/test_request_check.py, tests/launch/test_preflight.py,
tests/params/test_params_robustness.py, tests/launch/test_ray_connect.py, tests/launch/test_ray.py):
this script is a measurement of the shipped behaviour, not a test.

Groups (``--only N`` runs one, merging its rows into an existing JSON):

    0  control: matching ranks under one real torchrun generate
    1  CFG-parallel 2, rank 1 differs: --seed, --guidance-scale, --cache, DITCACHE_PARAMS_DIR
    2  rank 1 differs: --cfg-parallel 1, prompt count, --steps; rank 1 never started (plain processes, then
       node 1 never started under real torchrun --nnodes=2, whose own agent rendezvous then decides)
    3  Ray: --address with no head, RAY_ADDRESS with no head, --address auto with no cluster
    4  output pre-flight: unwritable dir, path under a file, bad suffix, existing file; calibrate --output
    5  bad request values: --guidance-scale inf / -5, a prompts file of blank lines
    6  params dir: bad user files (list still works), DITCACHE_PARAMS_DIR pointing nowhere
    7  kill -9 of rank 1 mid-denoising, --timeout 0, a non-UTF-8 params file, --height 100000
    8  SIGKILL of a ray-generate driver that started a local cluster: its processes are gone after

    OMP_NUM_THREADS=1 RAY_AUTH_MODE=disabled python bench/fault_matrix.py [--only N] [--out PATH]

Runs in about 3-5 minutes on 2 idle cores (longer when they are shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SHIPPED_PARAMS = REPO / "ditcache" / "params"
DEFAULT_OUT = REPO / "bench" / "results" / "fault_matrix.json"
PY = sys.executable
GENERATE = [PY, str(REPO / "launch" / "generate.py")]
CLI = [PY, "-m", "ditcache.cli"]
# The reference model, few steps, CFG-parallel 2; rank 1 gets extra arguments on top.
COMMON = ["--model", "reference", "--steps", "4", "--cfg-parallel", "2", "--no-progress", "--timeout", "30"]
ONE = ["--model", "reference", "--steps", "4", "--no-progress", "--prompt", "a handwritten 3"]
RANK_TIMEOUT_S = 150  # hard limit per process of a 2-rank case
SINGLE_TIMEOUT_S = 90
KILL_STEPS = 2000  # long enough that rank 1 is killed mid-denoising on a fast machine too


# -- processes ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(work: Path) -> dict[str, str]:
    """This process's environment minus anything that would leak a user's setup into a case."""
    env = {k: v for k, v in os.environ.items() if k not in ("DITCACHE_PARAMS_DIR", "RAY_ADDRESS")}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        OMP_NUM_THREADS="1",
        RAY_AUTH_MODE="disabled",
        PYTHONPATH=str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        XDG_CONFIG_HOME=str(work / "xdg"),  # an empty user params dir: the caller's own stays out
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class Proc:
    """One started process, its log files and how it ended."""

    name: str
    popen: subprocess.Popen
    stdout: Path
    stderr: Path
    started: float
    ended: float | None = None
    timed_out: bool = False

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None and self.ended is None:
            self.ended = time.monotonic()
        return code

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.popen.pid, sig)  # its own session: the group id is its pid
        except (ProcessLookupError, PermissionError):
            pass


def start(name: str, argv: list[str], env: dict[str, str], cwd: Path) -> Proc:
    out, err = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    return Proc(name, popen, out, err, time.monotonic())


def wait_all(procs: list[Proc], timeout_s: float) -> None:
    """Wait for every process; one still running after ``timeout_s`` (from its start) is killed."""
    while True:
        running = [p for p in procs if p.poll() is None]
        if not running:
            return
        now = time.monotonic()
        for p in running:
            if now - p.started > timeout_s:
                p.timed_out = True
                p.kill_group()
                p.popen.wait()
                p.poll()
        time.sleep(0.05)


def rank_env(env: dict[str, str], rank: int, world: int, port: int) -> dict[str, str]:
    """The environment torchrun gives rank ``rank`` of a ``world``-node job (one rank per node)."""
    return {**env, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": "1",
            "GROUP_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


# -- observations ---------------------------------------------------------------------------------------------


ERROR_RE = re.compile(r"\berror\b|Error\b", re.IGNORECASE)
WARNING_RE = re.compile(r"Warning\b", re.IGNORECASE)
OWN_ERROR_RE = re.compile(r"^(error\b|\S+( \S+)?: error: )")  # "error (rank 1): ...", "ditcache generate: error: ..."
EXCEPTION_RE = re.compile(r"^[\w.]+(Error|Exception)\b")  # a traceback's last line


def first_error_line(text: str, exit_code: int | None = 1) -> str:
    """The first line that says error (argparse's ``prog: error: ...``, ``error (rank 1): ...``, an
    exception's last line), else the first warning; else, for a failed process, the last non-blank line
    (a tqdm bar's carriage returns split lines) or the signal that killed it; else ""."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    for pattern in (OWN_ERROR_RE, EXCEPTION_RE, ERROR_RE, WARNING_RE):
        for line in lines:
            if pattern.search(line) and not line.startswith("usage:"):
                return line
    if exit_code is not None and exit_code < 0:
        return f"(no error line: killed by {signal.Signals(-exit_code).name})"
    return lines[-1] if lines and exit_code else ""


@dataclass
class RankObs:
    rank: int | str
    exit_code: int | None
    first_error_line: str
    stderr_lines: int
    traceback: bool
    timed_out: bool
    exit_s: float | None  # seconds from the case's fault to this process's exit


def observe(p: Proc, label: int | str, t0: float) -> RankObs:
    text = p.stderr.read_text(errors="replace")
    return RankObs(
        rank=label,
        exit_code=p.popen.returncode,
        first_error_line=first_error_line(text, p.popen.returncode),
        stderr_lines=len([line for line in text.splitlines() if line.strip()]),
        traceback="Traceback (most recent call last)" in text,
        timed_out=p.timed_out,
        exit_s=None if p.ended is None else round(p.ended - t0, 2),
    )


@dataclass
class Result:
    group: int
    case: str
    expected: str
    command: str
    ranks: list[RankObs] = field(default_factory=list)
    output_written: bool | None = None
    time_to_fail_s: float | None = None
    result: str = "fail"  # pass | fail | skip
    why: list[str] = field(default_factory=list)  # the checks that failed, or why it was skipped
    notes: str = ""


def check(res: Result, *, codes: Callable[[int | None], bool] | None = None, contains: list[str] | None = None,
          per_rank: dict | None = None, same_line: bool = False, no_traceback: bool = True,
          no_output: bool = True, max_s: float | None = None) -> Result:
    """Judge ``res`` against the expectation; record every failed check in ``res.why``."""
    why = []
    for r in res.ranks:
        who = f"rank {r.rank}" if isinstance(r.rank, int) else str(r.rank)
        if r.timed_out:
            why.append(f"{who} hit the hard timeout")
        if codes is not None and not codes(r.exit_code):
            why.append(f"{who} exit code {r.exit_code}")
        needles = (per_rank or {}).get(r.rank, contains or [])
        for needle in needles:
            if needle not in r.first_error_line:
                why.append(f"{who}'s error line lacks {needle!r}")
        if no_traceback and r.traceback:
            why.append(f"{who} printed a traceback")
    if same_line and len({r.first_error_line.split(": ", 1)[-1] for r in res.ranks}) > 1:
        why.append("the ranks' error lines differ")
    if no_output and res.output_written:
        why.append("an output was written")
    if max_s is not None and (res.time_to_fail_s is None or res.time_to_fail_s > max_s):
        why.append(f"took {res.time_to_fail_s} s (> {max_s:g} s)")
    res.why = why
    res.result = "fail" if why else "pass"
    return res


def failed(code: int | None) -> bool:
    return code is not None and code != 0


def exit2(code: int | None) -> bool:
    return code == 2


def skip(res: Result, reason: str) -> Result:
    res.result, res.why = "skip", [reason]
    return res


# -- case runners ---------------------------------------------------------------------------------------------


def two_ranks(work: Path, args: list[list[str]], envs: list[dict[str, str]] | None = None,
              launch: tuple[int, ...] = (0, 1), timeout_s: float = RANK_TIMEOUT_S) -> tuple[list[Proc], float]:
    """Ranks 0 and 1 of a world-2 job (``args[r]``: rank r's generate arguments; only ``launch`` started)."""
    port = free_port()
    env = base_env(work)
    t0 = time.monotonic()
    procs = [start(f"rank{r}", [*GENERATE, *args[r]], rank_env({**env, **((envs or [{}, {}])[r])}, r, 2, port), work)
             for r in launch]
    wait_all(procs, timeout_s)
    return procs, t0


def describe_two(args: list[list[str]], envs: list[dict[str, str]] | None, launch=(0, 1)) -> str:
    parts = []
    for r in launch:
        extra = " ".join(f"{k}={v}" for k, v in ((envs or [{}, {}])[r]).items())
        parts.append(f"rank {r}: {extra + ' ' if extra else ''}launch/generate.py {' '.join(args[r])}")
    return " | ".join(parts)


def mismatch_case(group: int, name: str, expected: str, rank1: list[str], needle: str, work: Path,
                  rank1_env: dict[str, str] | None = None, max_s: float = 90) -> Result:
    """CFG-parallel 2 with rank 1 started differently: both ranks fail with the same line naming it."""
    out = work / "out.png"
    args = [[*COMMON, "--output", str(out)], [*COMMON, "--output", str(out), *rank1]]
    envs = [{}, rank1_env or {}]
    res = Result(group, name, expected, describe_two(args, envs))
    procs, t0 = two_ranks(work, args, envs)
    res.ranks = [observe(p, r, t0) for r, p in enumerate(procs)]
    res.output_written = out.exists()
    res.time_to_fail_s = round(max(p.ended for p in procs) - t0, 2)
    return check(res, codes=exit2, contains=[needle], same_line=True, max_s=max_s)


def single(group: int, name: str, expected: str, argv: list[str], work: Path, *, env_extra: dict | None = None,
           output: Path | None = None, keep: Path | None = None, codes=exit2, contains: list[str] | None = None,
           max_s: float = 30, one_line: bool = True, timeout_s: float = SINGLE_TIMEOUT_S) -> Result:
    """One process; ``output`` must not appear, ``keep`` (an existing file) must keep its bytes."""
    env = {**base_env(work), **(env_extra or {})}
    shown = " ".join(f"{k}={v}" for k, v in (env_extra or {}).items())
    res = Result(group, name, expected, (shown + " " if shown else "") + " ".join(_short(a) for a in argv))
    before = _digest(keep) if keep is not None else None
    t0 = time.monotonic()
    proc = start("proc", argv, env, work)
    wait_all([proc], timeout_s)
    res.ranks = [observe(proc, "proc", t0)]
    res.time_to_fail_s = res.ranks[0].exit_s
    written = output is not None and output.exists()
    if keep is not None:
        written = written or _digest(keep) != before
    res.output_written = written
    res = check(res, codes=codes, contains=contains, max_s=max_s)
    if one_line:
        text = proc.stderr.read_text(errors="replace")
        errors = [line for line in text.splitlines() if ERROR_RE.search(line) and not line.startswith("usage:")]
        if len(errors) != 1:
            res.why.append(f"{len(errors)} error lines on stderr")
            res.result = "fail"
    return res


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _short(arg: str) -> str:
    return arg.replace(str(REPO) + "/", "").replace(PY, "python")


# -- the groups -----------------------------------------------------------------------------------------------


def group0(tmp: Callable[[str], Path]) -> list[Result]:
    work = tmp("control")
    out = work / "out.png"
    argv = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            str(REPO / "launch" / "generate.py"), *COMMON, "--output", str(out)]
    res = Result(0, "control: matching ranks (one torchrun, 2 ranks)", "both ranks exit 0, rank 0 writes the PNG",
                 " ".join(_short(a) for a in argv))
    t0 = time.monotonic()
    proc = start("torchrun", argv, base_env(work), work)
    wait_all([proc], RANK_TIMEOUT_S)
    obs = observe(proc, "torchrun", t0)
    res.ranks = [obs]
    res.output_written = out.exists()
    res.time_to_fail_s = obs.exit_s
    summary = (proc.stdout.read_text().strip().splitlines() or [""])[0]
    res.notes = f"a success, so the time is the whole run; rank 0 printed: {summary}"
    res = check(res, codes=lambda c: c == 0, no_output=False)
    if not res.output_written:
        res.why.append("no output written")
        res.result = "fail"
    return [res]


def group1(tmp) -> list[Result]:
    exp = "both ranks exit 2, same one line 'ranks disagree on the request before step 0: {} differs', nothing written"
    rows = [
        mismatch_case(1, "rank 1 --seed 7", exp.format("seed"), ["--seed", "7"], "seed differs", tmp("seed")),
        mismatch_case(1, "rank 1 --guidance-scale 3.0", exp.format("guidance_scale"), ["--guidance-scale", "3.0"],
                      "guidance_scale differs", tmp("guidance")),
        mismatch_case(1, "rank 1 --cache none", exp.format("cache"), ["--cache", "none"], "cache differs",
                      tmp("cache")),
    ]
    work = tmp("paramsdir")
    user = work / "user-params"
    user.mkdir()
    params = json.loads((SHIPPED_PARAMS / "Reference-Digits.json").read_text())
    params["thresh"] = params["thresh"] * 2
    (user / "Reference-Digits.json").write_text(json.dumps(params))
    rows.append(mismatch_case(1, "rank 1 DITCACHE_PARAMS_DIR with another Reference-Digits", exp.format("params_hash"),
                              [], "params_hash differs", work, rank1_env={"DITCACHE_PARAMS_DIR": str(user)}))
    return rows


def group2(tmp) -> list[Result]:
    rows = [
        mismatch_case(2, "rank 1 --cfg-parallel 1", "both ranks exit 2, same one line 'ranks disagree on the "
                      "parallel layout: cfg_degree differs', nothing written", ["--cfg-parallel", "1"],
                      "cfg_degree differs", tmp("layout")),
        mismatch_case(2, "rank 1 2 prompts (rank 0 the default 10)", "both ranks exit 2, same one line naming the "
                      "prompts (prompt_hash / num_prompts differs), nothing written",
                      ["--prompt", "a handwritten 1", "--prompt", "a handwritten 2"], "differs", tmp("prompts")),
        mismatch_case(2, "rank 1 --steps 8", "both ranks exit 2, same one line 'num_inference_steps differs', "
                      "nothing written", ["--steps", "8"], "num_inference_steps differs", tmp("steps")),
    ]
    # rank 1 never starts: rank 0 alone, --timeout 10
    work = tmp("missing")
    out = work / "out.png"
    args = [[*COMMON[:-1], "10", "--output", str(out)], []]
    res = Result(2, "rank 1 never started (--timeout 10)", "rank 0 exits 2 within ~timeout + start-up with one line "
                 "'rank 1 of 2 did not join the job at ... within 10 s', nothing written",
                 describe_two(args, None, launch=(0,)) + " | rank 1: not started")
    procs, t0 = two_ranks(work, args, launch=(0,))
    res.ranks = [observe(procs[0], 0, t0)]
    res.output_written = out.exists()
    res.time_to_fail_s = round(procs[0].ended - t0, 2)
    rows.append(check(res, codes=exit2, contains=["rank 1 of 2 did not join", "within 10 s"], max_s=45))

    # the same under real torchrun, one agent per node: node 1's agent never starts
    work = tmp("missing_torchrun")
    out = work / "out.png"
    argv = [PY, "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=0", "--nproc_per_node=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--rdzv-conf", "timeout=15",
            str(REPO / "launch" / "generate.py"), *COMMON[:-1], "10", "--output", str(out)]
    res = Result(2, "node 1 never started, real torchrun --nnodes=2 (node 0 only, --rdzv-conf timeout=15)",
                 "outside ditcache: torchrun's agent gives up at its --rdzv-conf timeout (the README says to set it)", " ".join(_short(a) for a in argv))
    t0 = time.monotonic()
    proc = start("torchrun", argv, base_env(work), work)
    wait_all([proc], 60)
    res.ranks = [observe(proc, "node 0 agent", t0)]
    res.output_written = out.exists()
    res.time_to_fail_s = res.ranks[0].exit_s
    res = check(res, codes=failed, contains=["1/2 clients joined"], no_traceback=False, max_s=30)
    res.notes = ("torchrun's own agent rendezvous (static, default timeout 600 s, silent meanwhile) waits for the "
                 "other node before any rank process starts, so ditcache's --timeout and its message never apply; "
                 "the agent fails with its traceback and exit 1; without --rdzv-conf it waits 600 s")
    rows.append(res)
    return rows


def gcs_servers() -> list[int]:
    found = []
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == "gcs_server":
            found.append(p.pid)
    return found


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


RAY_COMMON = ["ray-generate", "--model", "reference", "--steps", "4", "--cfg-parallel", "2", "--ranks", "2",
              "--no-progress", "--prompt", "a handwritten 3"]


def group3(tmp) -> list[Result]:
    rows = []
    work = tmp("ray_addr")
    env = {"RAY_TMPDIR": str(work / "r")}
    (work / "r").mkdir()
    out = work / "out"
    rows.append(single(
        3, "--address 127.0.0.1:1 --connect-timeout 5 (no head)",
        "exit 2 after ~5 s with one line naming 127.0.0.1:1, 'within 5 s' and `ray start --head`; nothing written",
        [*CLI, *RAY_COMMON, "--output-dir", str(out), "--address", "127.0.0.1:1", "--connect-timeout", "5"], work,
        env_extra=env, output=out, contains=["127.0.0.1:1", "within 5 s", "ray start --head"], max_s=25))

    work = tmp("ray_env")
    (work / "r").mkdir()
    out = work / "out"
    res = Result(3, "RAY_ADDRESS=127.0.0.1:6379 (no head), --connect-timeout 5", "", "")
    if port_open(6379):
        rows.append(skip(res, "something listens on 127.0.0.1:6379 on this machine"))
    else:
        rows.append(single(
            3, res.case, "exit 2 after ~5 s with one line naming 127.0.0.1:6379 and 'within 5 s'; nothing written",
            [*CLI, *RAY_COMMON, "--output-dir", str(out), "--connect-timeout", "5"], work,
            env_extra={"RAY_TMPDIR": str(work / "r"), "RAY_ADDRESS": "127.0.0.1:6379"}, output=out,
            contains=["127.0.0.1:6379", "within 5 s"], max_s=25))

    work = tmp("ray_auto")
    (work / "r").mkdir()
    out = work / "out"
    case = "--address auto, no cluster on the node"
    expected = "exit 2 quickly with one line naming --address auto and that no cluster runs; nothing written"
    deadline = time.monotonic() + 20  # another job's local cluster on this node would be found by 'auto'
    while gcs_servers() and time.monotonic() < deadline:
        time.sleep(1)
    if gcs_servers():
        rows.append(skip(Result(3, case, expected, ""), f"a Ray cluster runs on this node (gcs_server pids "
                                                         f"{gcs_servers()}): 'auto' would join it"))
    else:
        rows.append(single(
            3, case, expected, [*CLI, *RAY_COMMON, "--output-dir", str(out), "--address", "auto",
                                "--connect-timeout", "5"], work,
            env_extra={"RAY_TMPDIR": str(work / "r")}, output=out, contains=["--address auto"], max_s=25))
    return rows


def group4(tmp) -> list[Result]:
    rows = []
    work = tmp("unwritable")
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    case = "--output in a chmod 555 directory"
    expected = "exit 2 before loading, one line 'cannot write in ... (permission denied)'"
    if os.access(locked, os.W_OK):
        rows.append(skip(Result(4, case, expected, ""), f"running as uid {os.geteuid()}: a 0555 directory is "
                                                        "writable to this user, so the fault cannot be provoked"))
    else:
        rows.append(single(4, case, expected, [*CLI, "generate", *ONE, "--output", str(locked / "x.png")], work,
                           output=locked / "x.png", contains=["permission denied"], max_s=20))
    locked.chmod(0o755)

    work = tmp("underfile")
    (work / "afile").write_text("a file")
    rows.append(single(4, "--output under a regular file", "exit 2 before loading, one line '... is a file, not "
                       "a directory'", [*CLI, "generate", *ONE, "--output", str(work / "afile" / "x.png")], work,
                       keep=work / "afile", contains=["is a file, not a directory"], max_s=20))

    work = tmp("suffix")
    rows.append(single(4, "--output x.xyz", "exit 2 before loading, one line '--output ... must end in .png or .mp4'",
                       [*CLI, "generate", *ONE, "--output", str(work / "x.xyz")], work, output=work / "x.xyz",
                       contains=["must end in .png or .mp4"], max_s=20))

    work = tmp("exists")
    (work / "x.png").write_bytes(b"keep me")
    rows.append(single(4, "existing --output, no --overwrite", "exit 2 before loading, one line '... already exists; "
                       "pass --overwrite', the file kept", [*CLI, "generate", *ONE, "--output", str(work / "x.png")],
                       work, keep=work / "x.png", contains=["already exists; pass --overwrite"], max_s=20))

    work = tmp("cal_dir")
    (work / "params.json").mkdir()
    rows.append(single(4, "calibrate --output <a directory>.json", "exit 2 before loading, one line '--output ... is "
                       "a directory'", [*CLI, "calibrate", "--steps", "4", "--no-progress", "--output",
                                        str(work / "params.json")], work,
                       contains=["is a directory"], max_s=20))

    work = tmp("cal_shipped")
    shipped = SHIPPED_PARAMS / "Reference-Digits.json"
    rows.append(single(4, "calibrate --output <shipped Reference-Digits.json>", "exit 2 before loading, one line "
                       "'... inside ditcache's shipped params', the file kept",
                       [*CLI, "calibrate", "--steps", "4", "--no-progress", "--output", str(shipped)], work,
                       keep=shipped, contains=["shipped params"], max_s=20))
    return rows


def parse_error_two_ranks(group: int, name: str, expected: str, extra: list[str], needles: list[str], work: Path,
                          max_s: float = 30) -> Result:
    """Both ranks of a world-2 job given the same bad value: each refuses it on its own, at once."""
    out = work / "out.png"
    args = [[*COMMON, "--output", str(out), *extra]] * 2
    res = Result(group, name, expected, describe_two(args, None))
    procs, t0 = two_ranks(work, args)
    res.ranks = [observe(p, r, t0) for r, p in enumerate(procs)]
    res.output_written = out.exists()
    res.time_to_fail_s = round(max(p.ended for p in procs) - t0, 2)
    return check(res, codes=exit2, contains=needles, same_line=True, max_s=max_s)


def group5(tmp) -> list[Result]:
    work = tmp("blank")
    blank = work / "prompts.txt"
    blank.write_text("\n   \n\n")
    return [
        parse_error_two_ranks(5, "--guidance-scale inf (both ranks)", "each rank exits 2 at parse time: "
                              "'argument --guidance-scale: inf must be finite and >= 1'", ["--guidance-scale", "inf"],
                              ["--guidance-scale", "must be finite"], tmp("g_inf")),
        parse_error_two_ranks(5, "--guidance-scale -5 (both ranks)", "each rank exits 2 at parse time: "
                              "'argument --guidance-scale: -5 must be finite and >= 1'", ["--guidance-scale=-5"],
                              ["--guidance-scale", "must be finite"], tmp("g_neg")),
        parse_error_two_ranks(5, "--prompts-file of blank lines (both ranks)", "each rank exits 2 before the process "
                              "group with one line '--prompts-file ... has no prompts (every line is blank)'",
                              ["--prompts-file", str(blank)], ["has no prompts (every line is blank)"], work),
    ]


def group6(tmp) -> list[Result]:
    rows = []
    work = tmp("baduser")
    user = work / "params"
    user.mkdir()
    good = {"K": 2, "retention_ratio": 0.2, "thresh": 0.1, "cond_mag_ratios": [1.0, 0.99, 0.98, 0.9],
            "uncond_mag_ratios": [1.0, 0.99, 0.98, 0.9]}
    (user / "MyModel.json").write_text(json.dumps(good))
    (user / "Broken.json").write_bytes(b"{not json")
    latin = json.dumps({**good, "model_type": "Caf\xe9"}, ensure_ascii=False).encode("latin-1")
    (user / "Latin.json").write_bytes(latin)
    (user / "Keyless.json").write_text(json.dumps({"K": 2}))
    (user / "Locked.json").write_text(json.dumps(good))
    (user / "Locked.json").chmod(0)
    bad = ["Broken", "Latin", "Keyless"]
    unreadable = not os.access(user / "Locked.json", os.R_OK)
    if unreadable:
        bad.append("Locked")
    env = {"DITCACHE_PARAMS_DIR": str(user)}
    argv = [*CLI, "list", "--json"]
    res = Result(6, "bad user files in DITCACHE_PARAMS_DIR: ditcache list", "exit 0; shipped models and MyModel "
                 "listed, each bad file (not JSON, not UTF-8, missing keys, unreadable) skipped with exactly one "
                 "warning naming it, no traceback", f"DITCACHE_PARAMS_DIR={user} " + " ".join(_short(a) for a in argv))
    t0 = time.monotonic()
    proc = start("list", argv, {**base_env(work), **env}, work)
    wait_all([proc], SINGLE_TIMEOUT_S)
    obs = observe(proc, "proc", t0)
    res.ranks, res.time_to_fail_s, res.output_written = [obs], obs.exit_s, False
    err = proc.stderr.read_text(errors="replace")
    why = []
    if obs.exit_code != 0:
        why.append(f"exit code {obs.exit_code}")
    try:
        listed = {row["model_type"] for row in json.loads(proc.stdout.read_text())}
    except (ValueError, KeyError, TypeError):
        listed = set()
        why.append("stdout is not the JSON listing")
    for name in ("Wan2.1-T2V-1.3B", "Qwen-Image", "Reference-Digits", "MyModel"):
        if name not in listed:
            why.append(f"{name} not listed")
    for name in bad:
        if name in listed:
            why.append(f"bad {name} listed")
        if err.count(f"{name}.json") != 1:
            why.append(f"{name}.json named {err.count(f'{name}.json')} times on stderr")
    if obs.traceback:
        why.append("traceback")
    res.why, res.result = why, "fail" if why else "pass"
    warnings = len(re.findall(r"UserWarning: ", err))
    res.notes = (f"{len(listed)} models listed; {warnings} warning(s), {obs.stderr_lines} stderr line(s) (Python's "
                 "warning format adds the source line under each)"
                 + ("" if unreadable else f"; Locked.json (mode 000) is readable as uid {os.geteuid()}, so it is "
                    "listed and not counted as bad"))
    rows.append(res)

    work = tmp("nowhere")
    nowhere = work / "no" / "such" / "dir"
    rows.append(single(6, "DITCACHE_PARAMS_DIR pointing nowhere: ditcache list", "exit 2, one line naming the path, "
                       "'does not exist' and DITCACHE_PARAMS_DIR", [*CLI, "list"], work,
                       env_extra={"DITCACHE_PARAMS_DIR": str(nowhere)},
                       contains=[str(nowhere), "does not exist", "DITCACHE_PARAMS_DIR"], max_s=20))
    return rows


def kill_rank1_mid_run(tmp) -> Result:
    """Rank 0 shows its progress bar; 1.5 s after it first appears, rank 1 gets SIGKILL."""
    work = tmp("kill9")
    out = work / "out.png"
    common = ["--model", "reference", "--steps", str(KILL_STEPS), "--cache", "none", "--cfg-parallel", "2",
              "--timeout", "30", "--output", str(out), "--prompt", "a handwritten 3"]
    args = [common, [*common, "--no-progress"]]
    res = Result(7, f"SIGKILL rank 1 ~1.5 s into denoising ({KILL_STEPS} steps)",
                 "rank 1 dies (-9); rank 0 exits 2 within seconds with one line naming the collective and "
                 "'a peer closed its connection', nothing written",
                 describe_two(args, None) + " | kill -9 rank 1 1.5 s after rank 0's progress bar appears")
    port = free_port()
    env = base_env(work)
    t_launch = time.monotonic()
    procs = [start(f"rank{r}", [*GENERATE, *args[r]], rank_env(env, r, 2, port), work) for r in (0, 1)]
    t_kill = None
    deadline = t_launch + RANK_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        if re.search(rf"\d+/{KILL_STEPS}", procs[0].stderr.read_text(errors="replace")):
            time.sleep(1.5)
            if procs[1].poll() is None:
                t_kill = time.monotonic()
                os.kill(procs[1].popen.pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    wait_all(procs, RANK_TIMEOUT_S)
    t0 = t_kill if t_kill is not None else t_launch
    res.ranks = [observe(p, r, t0) for r, p in enumerate(procs)]
    res.output_written = out.exists()
    res.time_to_fail_s = round(procs[0].ended - t0, 2)
    bar = re.findall(rf"(\d+)/{KILL_STEPS}", procs[0].stderr.read_text(errors="replace"))
    res.notes = (f"killed at {t_kill - t_launch:.1f} s after launch; rank 0's bar had reached "
                 f"step {bar[-1]}/{KILL_STEPS}"
                 if t_kill is not None and bar else "rank 1 was never killed (no progress bar seen)")
    res = check(res, per_rank={0: ["a peer closed its connection"], 1: []}, max_s=35)
    if t_kill is None:
        res.why.append("the kill was not sent")
    if res.ranks[0].exit_code != 2:
        res.why.append(f"rank 0 exit code {res.ranks[0].exit_code}")
    if res.ranks[1].exit_code != -signal.SIGKILL:
        res.why.append(f"rank 1 exit code {res.ranks[1].exit_code}")
    res.result = "fail" if res.why else "pass"
    return res


def group7(tmp) -> list[Result]:
    rows = [kill_rank1_mid_run(tmp)]
    rows.append(parse_error_two_ranks(7, "--timeout 0 (both ranks)", "each rank exits 2 at parse time: 'argument "
                                      "--timeout: 0 must be a finite number of seconds > 0'", ["--timeout", "0"],
                                      ["argument --timeout", "> 0"], tmp("timeout0")))
    work = tmp("latin")
    user = work / "params"
    user.mkdir()
    params = json.loads((SHIPPED_PARAMS / "Reference-Digits.json").read_text())
    params["model_type"] = "Caf\xe9"  # an accented value, saved as latin-1 as an old editor would
    (user / "Reference-Digits.json").write_bytes(json.dumps(params, ensure_ascii=False).encode("latin-1"))
    rows.append(single(7, "non-UTF-8 Reference-Digits.json in DITCACHE_PARAMS_DIR: generate", "exit 2, one line "
                       "'params file .../Reference-Digits.json is not UTF-8 text (...)', nothing written",
                       [*CLI, "generate", *ONE, "--output", str(work / "x.png")], work,
                       env_extra={"DITCACHE_PARAMS_DIR": str(user)}, output=work / "x.png",
                       contains=["Reference-Digits.json is not UTF-8"], max_s=40))
    work = tmp("height")
    rows.append(single(7, "--height 100000: generate", "exit 2, one line naming height and the model's limit, "
                       "nothing written", [*CLI, "generate", *ONE, "--height", "100000", "--output",
                                           str(work / "x.png")], work,
                       output=work / "x.png", contains=["height"], max_s=40))
    return rows


def group8(tmp) -> list[Result]:
    """A ray-generate driver that started its own local cluster is SIGKILLed once its ranks run."""
    work = tmp("raykill")
    ray_tmp = Path(tempfile.mkdtemp(prefix="fmr_", dir="/tmp"))  # short: Ray's socket paths have a length limit
    out = work / "out"
    argv = [*CLI, "ray-generate", "--model", "reference", "--steps", str(KILL_STEPS), "--cache", "none",
            "--cfg-parallel", "2", "--ranks", "2", "--cpus-per-rank", "0.5", "--no-progress", "--output-dir", str(out),
            "--prompt", "a handwritten 3", "--prompt", "a handwritten 4"]
    res = Result(8, "SIGKILL of a ray-generate driver that started a local cluster",
                 "every process of its cluster (gcs_server, raylet, agents, workers) gone within 10 s",
                 f"RAY_TMPDIR={ray_tmp} " + " ".join(_short(a) for a in argv) + " | kill -9 the driver once its "
                 "rank actors run")
    env = {**base_env(work), "RAY_TMPDIR": str(ray_tmp)}
    t_launch = time.monotonic()
    driver = start("driver", argv, env, work)
    family: dict[int, psutil.Process] = {}
    try:
        deadline = t_launch + 150
        ready = False
        while time.monotonic() < deadline and driver.poll() is None:
            names = [_name(p) for p in _tree(driver.popen.pid)]
            # rank actors are Ray workers titled after their class and method: ray::RankActor.serve
            if "raylet" in names and sum(n.startswith("ray::RankActor.serve") for n in names) >= 2:
                ready = True
                time.sleep(1.0)  # a second into the request
                break
            time.sleep(0.25)
        family.update((p.pid, p) for p in _tree(driver.popen.pid))
        for p in psutil.process_iter(["cmdline"]):  # also whatever names the cluster's temp dir
            if str(ray_tmp) in " ".join(p.info["cmdline"] or []) and p.pid != driver.popen.pid:
                family.setdefault(p.pid, p)
        started_names = sorted(_name(p) for p in family.values())
        if driver.poll() is not None:
            res.ranks = [observe(driver, "driver", t_launch)]
            res.why = [f"the driver exited (code {driver.popen.returncode}) before it could be killed: the job was "
                       "too short or failed"]
            return [res]
        t_kill = time.monotonic()
        os.kill(driver.popen.pid, signal.SIGKILL)
        driver.popen.wait()
        driver.poll()
        left = list(family.values())
        while time.monotonic() - t_kill < 10:
            left = [p for p in left if _alive(p)]
            if not left:
                break
            time.sleep(0.2)
        gone_s = time.monotonic() - t_kill
        left = [p for p in left if _alive(p)]
        res.ranks = [observe(driver, "driver", t_kill)]
        res.output_written = None
        res.time_to_fail_s = round(gone_s, 2) if not left else None
        res.notes = (f"killed {t_kill - t_launch:.1f} s after launch "
                     f"({'2 rank actors in serve' if ready else 'no rank actor seen serving'}); "
                     f"{len(family)} processes of its cluster before: {', '.join(_counted(started_names))}; "
                     + (f"all gone {gone_s:.1f} s after the kill" if not left else
                        f"left 10 s after the kill: {', '.join(f'{p.pid} {_name(p)}' for p in left)}"))
        why = []
        if not {"gcs_server", "raylet"} <= set(started_names):
            why.append("no gcs_server/raylet seen under the driver")
        if not ready:
            why.append("no rank actor was seen serving before the kill")
        if left:
            why.append(f"{len(left)} process(es) left 10 s after the kill")
        res.why, res.result = why, "fail" if why else "pass"
    finally:
        # whatever this case started and is still running: the driver's tree, the processes recorded
        # before the kill (orphans by now), anything naming this case's own Ray temp dir
        for p in [*(_tree(driver.popen.pid) if driver.poll() is None else []), *family.values()]:
            if _alive(p):
                _kill(p)
        driver.kill_group()
        for p in psutil.process_iter(["cmdline"]):
            if str(ray_tmp) in " ".join(p.info["cmdline"] or []):
                _kill(p)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return [res]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill(p: psutil.Process) -> None:
    try:
        p.kill()
    except psutil.Error:
        pass


def _counted(names: list[str]) -> list[str]:
    return [f"{n} x{names.count(n)}" if names.count(n) > 1 else n for n in sorted(set(names))]


GROUPS: dict[int, Callable] = {0: group0, 1: group1, 2: group2, 3: group3, 4: group4, 5: group5, 6: group6,
                               7: group7, 8: group8}


# -- report ---------------------------------------------------------------------------------------------------


def cell(text: str, limit: int = 150) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown(results: list[Result]) -> str:
    lines = ["| # | case | expected | exit codes | first error line per rank | output | time to fail (s) | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        codes = ", ".join(f"{o.rank}: {o.exit_code}" for o in r.ranks) if r.ranks else "-"
        errs = "<br>".join(f"{o.rank}: " + (f"`{cell(o.first_error_line)}`" if o.first_error_line else "(none)")
                           + (" (+traceback)" if o.traceback else "") for o in r.ranks) or "-"
        out = {True: "written", False: "none", None: "-"}[r.output_written]
        verdict = r.result.upper() + (f": {cell('; '.join(r.why), 200)}" if r.why else "")
        if r.notes:
            verdict += f" ({cell(r.notes, 300)})"
        t = "-" if r.time_to_fail_s is None else f"{r.time_to_fail_s:.1f}"
        row = [str(r.group), cell(r.case), cell(r.expected, 200), codes, errs, out, t, verdict]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def versions() -> dict:
    found = {}
    for module in ("torch", "ray", "diffusers"):
        try:
            found[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing package is recorded, not fatal
            found[module] = None
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=int, choices=sorted(GROUPS), action="append", help="run this group (repeatable)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep", action="store_true", help="keep the cases' work folders (logs) and print where")
    args = parser.parse_args(argv)
    groups = args.only or sorted(GROUPS)
    root = Path(tempfile.mkdtemp(prefix="fault_matrix_"))

    def tmp(name: str) -> Path:
        folder = root / name
        folder.mkdir()
        return folder

    started = time.monotonic()
    results: list[Result] = []
    try:
        for g in groups:
            t = time.monotonic()
            rows = GROUPS[g](tmp)
            results += rows
            print(f"group {g}: {len(rows)} case(s) in {time.monotonic() - t:.0f} s: "
                  + ", ".join(f"{r.case} {r.result}" for r in rows), file=sys.stderr, flush=True)
    finally:
        for folder in root.rglob("*"):  # chmod'ed fixtures, so rmtree can remove them
            if folder.is_dir() and not folder.is_symlink():
                folder.chmod(folder.stat().st_mode | stat.S_IRWXU)
        if args.keep:
            print(f"logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.monotonic() - started
    table = markdown(results)
    print(table)
    counts = {k: sum(r.result == k for r in results) for k in ("pass", "fail", "skip")}
    print(f"\n{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip in {wall:.0f} s")

    rows = [asdict(r) for r in results]
    if args.only and args.out.exists():  # keep the other groups' rows from an earlier full run
        try:
            old = json.loads(args.out.read_text())
            rows = [r for r in old.get("cases", []) if r["group"] not in groups] + rows
            rows.sort(key=lambda r: r["group"])
        except (ValueError, KeyError, TypeError):
            pass
    payload = {
        "benchmark": "fault_matrix",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "groups_run": groups,
        "wall_s": round(wall, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "uid": os.geteuid(), **versions()},
        "summary": {k: sum(r["result"] == k for r in rows) for k in ("pass", "fail", "skip")},
        "cases": rows,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
