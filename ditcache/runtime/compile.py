"""``torch.compile`` of the transformer block stack, with the cache's decisions left in Python.

Regional compilation: each transformer block is compiled (``fullgraph=True``) and the Python loop
over the blocks stays eager. The feature cache decides outside every compiled region whether the
stack runs at all, so a skip never breaks or re-specialises a graph, and the "first block probe"
of caches that look at the first block's output (FirstBlockCache) runs compiled code too, then
continues from it. Identical blocks share one graph (dynamo lifts their weights to graph inputs),
so compiling a 30-block stack costs one block's compile time and does not recompile per block,
per step or per CFG branch; a request at another resolution compiles once more (dynamic shapes).

Sequence parallelism is not compiled: its Ulysses / ring attention processors run collectives
inside the blocks, which ``fullgraph=True`` cannot capture. :func:`check_compile_layout` refuses
that combination up front (the launcher calls it before loading the model).

    import ditcache
    pipe = ditcache.load_pipeline("path/to/Wan2.1-T2V-1.3B-Diffusers", device="cuda", dtype=torch.bfloat16)
    ditcache.compile_pipeline(pipe)          # every expert's blocks; the first request pays the compile
    out = pipe("a cat playing piano", cache="ada_taylor")
"""

from __future__ import annotations

from typing import Any

from ditcache.errors import ParamsError

__all__ = ["check_compile_layout", "compile_pipeline", "uncompile_pipeline"]


def check_compile_layout(compile: bool, ulysses_degree: int = 1, ring_degree: int = 1) -> None:
    """Refuse ``--compile`` with sequence parallelism (one line, before anything is loaded or run)."""
    if compile and (ulysses_degree > 1 or ring_degree > 1):
        raise ParamsError(
            f"--compile does not support sequence parallelism (ulysses {ulysses_degree} x ring {ring_degree}): its "
            "attention processors run collectives inside the compiled blocks; use --compile with --cfg-parallel "
            "and data-parallel replicas only"
        )


def compile_pipeline(pipe: Any, **compile_kwargs: Any) -> Any:
    """Compile the block stack of every expert adapter of a ditcache pipeline (``pipe.adapters``), in place.

    ``compile_kwargs`` go to ``torch.compile`` (``fullgraph=True`` unless given; e.g. ``mode=
    "max-autotune-no-cudagraphs"``, ``backend=...``). Compilation happens on the first request. Returns
    ``pipe``. A pipeline laid out with sequence parallelism is refused (:class:`ParamsError`).
    """
    adapters = getattr(pipe, "adapters", None)
    if not isinstance(adapters, dict) or not adapters:
        raise ParamsError(
            f"compile_pipeline takes a ditcache pipeline (with .adapters), got {type(pipe).__name__}; "
            "for a bare adapter call adapter.compile_stack()"
        )
    parallel = getattr(pipe, "parallel", None)
    if parallel is not None:
        config = parallel.config
        check_compile_layout(True, config.ulysses_degree, config.ring_degree)
    for adapter in adapters.values():
        adapter.compile_stack(**compile_kwargs)
    return pipe


def uncompile_pipeline(pipe: Any) -> Any:
    """Undo :func:`compile_pipeline`: every block runs eagerly again."""
    for adapter in pipe.adapters.values():
        adapter.uncompile_stack()
    return pipe
