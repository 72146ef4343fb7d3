"""One rank that loads its pipeline once and then serves requests: the per-rank half of ``ray-generate``.

``generate.run`` is a whole per-rank job (process group, model load, one request, teardown); a
server that takes many requests should pay for the process group and the model once. So
:class:`RankServer` splits that job: the constructor forms the rank's world from the ``torchrun``
environment and loads the pipeline, exactly as ``generate.run`` does, and :meth:`RankServer.serve`
runs one request on it with generate's own request keywords, output check and writer. Nothing here
imports Ray: the Ray actor (:class:`ditcache.launch.ray_cluster.RankActor`) only hosts a server.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack

from ditcache.launch import generate
from ditcache.launch.cache_options import cache_from_args
from ditcache.launch.models import load_pipeline, resolve_dtype, resolve_model
from ditcache.launch.session import parallel_session
from ditcache.runtime.compile import compile_pipeline
from ditcache.runtime.io import save_frames

# Pipelines this process has loaded: the actor reports it with every result, so a job can show that
# each rank loaded its model once however many requests it served.
MODEL_LOADS = 0


def model_loads() -> int:
    """How many pipelines this process has loaded so far."""
    return MODEL_LOADS


class RankServer:
    """This rank's process groups and pipeline, set up once; :meth:`serve` runs one request on them.

    ``args`` are the job's ``generate`` arguments (device resolved); the world is the rank's replica
    (``WORLD_SIZE`` = cfg x sp), so there is no data-parallel share or seed offset to apply.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        global MODEL_LOADS
        family, model_dir = resolve_model(args.model, args.model_dir)
        # The session stays open for the server's life (the actor process ends with it); a failed
        # load closes it so the rank does not keep a half-formed world.
        with ExitStack() as failure:
            self.groups, device = failure.enter_context(parallel_session(args))
            self.pipe = load_pipeline(family, model_dir, device, resolve_dtype(args.dtype, args.device), self.groups)
            if getattr(args, "compile", False):  # generate's --compile
                compile_pipeline(self.pipe)
            failure.pop_all()
        MODEL_LOADS += 1

    def serve(self, args: argparse.Namespace) -> generate.RunResult:
        """One request: ``args`` with its prompt(s) and ``--output``; rank 0 writes the output, unless
        ``--output`` is None (the caller takes rank 0's frames instead, as the HTTP service does)."""
        cache = cache_from_args(args)
        if args.output is not None:
            generate.check_destination(args, self.groups)
        kwargs = generate.request_kwargs(args, generate.read_prompts(args), cache)
        kwargs["progress"] = False  # ranks of many replicas would interleave their bars
        output = self.pipe(**kwargs)
        path = None
        if self.groups.rank == 0 and args.output is not None:
            path = save_frames(output.frames, args.output)
        return generate.RunResult(output, path, self.groups.rank)
