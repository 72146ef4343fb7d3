"""Ranks started with different arguments fail together, before any compute, with one clear error.

Two checks, each one all-gather after which every rank inspects the same table, so either all
ranks pass or all raise the same one-line error:

- :func:`check_layout` (run by ``init_parallel`` on the default group, before any subgroup exists):
  every rank parsed the same ``cfg_degree``, ``sp_degree``, ``dp_degree``, ``world_size`` and
  ``ring_degree``.
  Subgroup creation is collective, and ranks with different layouts create different subgroups, so
  without this check one rank waits forever in a group creation its peers never start while another
  runs alone. Raises :class:`LayoutMismatchError`.
- :func:`check_request` (run by a pipeline before step 0): every rank describes the same request in
  a :class:`RequestFingerprint`. Without it a CFG partner with another seed, guidance scale, cache
  or params file silently produces a wrong sample; other step counts or prompt counts die later in
  a collective with no word of the cause. Raises :class:`RequestMismatchError`.

Scopes of :func:`check_request`. Data-parallel replicas serve different requests on purpose:
replica ``r`` samples with ``seed + r`` from its own share of the prompts. So:

- within a replica (the ``cfg x sp`` ranks of ``groups.replica``) every field must agree exactly;
- across the whole job (``groups.world``) every field must agree except :data:`REPLICA_FIELDS`
  (``seed``, ``prompt_hash``, ``num_prompts``, ``latent_shape``), of which ``latent_shape`` still
  must agree beyond its batch dimension (dim 0 is the replica's prompt count).

Both scopes are checked on one world all-gather of ``(dp rank, fingerprint)``: a replica whose own
ranks agree still fails when another replica does not, so the job fails as a whole instead of some
replicas finishing and the rest dying alone. Being collective over the job, it must be called the
same number of times on every rank. The pipelines therefore check their first request job-wide
(every replica serves at least one: the launchers see to it) and later ones with
``scope="replica"``, since replicas may serve different numbers of requests (calibration batches).
If the all-gather itself fails, every rank that can still raise gets a one-line
:class:`CollectiveError` that names the ranks that never reached the check (when the default store
can tell) and whether the exchange timed out or lost a peer.

The pipelines build the fingerprint in ``DenoisingPipeline._check_request``, just before step 0.
On one process ``check_request`` returns at once, so the call needs no ``if``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
import torch.distributed as dist

from ditcache.cache.registry import CacheConfig, cache_config
from ditcache.errors import CollectiveError, LayoutMismatchError, RequestMismatchError
from ditcache.params.loader import CacheParams
from ditcache.parallel.config import ParallelConfig

if TYPE_CHECKING:  # groups.py imports this module (init_parallel runs check_layout)
    from ditcache.parallel.groups import Group, ParallelGroups

T = TypeVar("T")

#: Fields that must agree only within a replica (``latent_shape`` also across replicas beyond dim 0).
REPLICA_FIELDS: tuple[str, ...] = ("seed", "prompt_hash", "num_prompts", "latent_shape")
#: What each rank reports in the layout check, in this order.
LAYOUT_FIELDS: tuple[str, ...] = ("cfg_degree", "sp_degree", "dp_degree", "world_size", "ring_degree")

_SIGMA_DIGITS = 6  # sigmas are compared to 1e-6: same arithmetic on every rank, no float noise
_HASH_CHARS = 16  # 64 bits of sha256: collisions are no concern for a handful of ranks, messages stay short
_SHOWN_CHARS = 60  # longer values are shown around their first difference
_CHECK_COUNTS: dict[str, Iterator[int]] = {}  # per check name: how many this process started


@dataclass(frozen=True)
class RequestFingerprint:
    """What a rank is about to compute, in comparable form (see the module docstring for each source).

    Hash fields are :func:`fingerprint_hash`-style hex strings; ``params_hash`` is ``""`` when no
    cache runs on params. ``latent_shape`` starts with the batch (this replica's prompt count).
    """

    seed: int
    num_inference_steps: int
    sigmas: str
    sigma_shift: float
    guidance_scale: float
    prompt_hash: str
    num_prompts: int
    latent_shape: tuple[int, ...]
    layout: str
    cache: str
    params_hash: str
    model: str
    guidance_scale_2: float | None = None

    def __post_init__(self) -> None:
        # a list and a tuple of the same dims must compare equal (and be hashable)
        object.__setattr__(self, "latent_shape", tuple(int(d) for d in self.latent_shape))


def fingerprint_hash(obj: Any) -> str:
    """A short stable hash of a JSON-able value (dict keys sorted, tuples as lists).

    Anything else raises ``TypeError``: a repr may hold a memory address and differ between ranks
    that agree.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_CHARS]


def prompt_hash(prompts: Sequence[str], negatives: Sequence[str]) -> str:
    """Hash of the prompts and negative prompts, in order (order decides which sample is which)."""
    return fingerprint_hash({"prompts": list(prompts), "negatives": list(negatives)})


def sigmas_hash(sigmas: Iterable[float]) -> str:
    """Hash of the noise schedule, rounded to 1e-6 so ranks computing it identically agree exactly."""
    return fingerprint_hash([round(float(s), _SIGMA_DIGITS) for s in sigmas])


def params_hash(*params: CacheParams | None) -> str:
    """Hash of the params content each cache runs on (one entry per cache), ``""`` if none has params.

    Where the file lies and its provenance notes do not change a sample, so they are left out: ranks
    reading the same curves from different copies agree, ranks reading different curves do not.
    """
    if all(p is None for p in params):
        return ""
    return fingerprint_hash([None if p is None else _params_content(p) for p in params])


def cache_params(cache: object) -> CacheParams | None:
    """The params a built cache runs on (``AdaTaylorCache.params``), looking through wrappers that
    hold the cache as ``.cache`` (``SyncedCache``); None for a cache without params."""
    while not isinstance(getattr(cache, "params", None), CacheParams) and hasattr(cache, "cache"):
        cache = cache.cache
    params = getattr(cache, "params", None)
    return params if isinstance(params, CacheParams) else None


def _params_content(params: CacheParams) -> dict[str, Any]:
    content = dataclasses.asdict(params)
    del content["path"], content["provenance"]
    return content


def cache_description(cache: object) -> str:
    """A stable string of a request's ``cache=`` argument.

    A config (or a registered name) gives :meth:`CacheConfig.describe`; a mapping expert -> cache
    describes each entry; a built cache gives its class name only, since its settings are not
    introspectable in general (its params still reach :func:`params_hash`).
    """
    if cache is None:
        return "none"
    if isinstance(cache, str):
        return cache_config(cache).describe()
    if isinstance(cache, CacheConfig):
        return cache.describe()
    if isinstance(cache, Mapping):
        return "{" + ", ".join(f"{name}: {cache_description(cache[name])}" for name in sorted(cache)) + "}"
    return type(cache).__name__


def model_identity(*models: torch.nn.Module) -> str:
    """Class, dtype and config hash of each transformer, e.g. ``WanTransformer3DModel/float32/3f9c...``.

    The config's private keys (``_name_or_path``, ``_diffusers_version``, ...) are left out: the same
    model loaded from another path is the same model. Weights are not hashed (too slow for a 14B
    model), so two checkpoints with one config look alike; the params and the output catch those.
    """
    return "+".join(_one_model(model) for model in models)


def _one_model(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None) or {}
    public = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    dtype = str(next(model.parameters(), torch.empty(0)).dtype).removeprefix("torch.")
    return f"{type(model).__name__}/{dtype}/{fingerprint_hash(public)}"


# -- the checks -----------------------------------------------------------------------------------


def check_request(groups: ParallelGroups, fp: RequestFingerprint, *, scope: Literal["job", "replica"] = "job") -> None:
    """Raise the same :class:`RequestMismatchError` on every rank unless all ranks' fingerprints agree
    in their scope (module docstring); call it on every rank before the first step (collective over
    the whole job, or over this rank's replica only with ``scope="replica"``)."""
    group = groups.world if scope == "job" else groups.replica
    rows = _gather(
        group,
        "request check",
        lambda: group.all_gather_object((groups.dp_rank, fp), groups.device, op="request check"),
    )
    table = [(rank, dp_rank, theirs) for rank, (dp_rank, theirs) in zip(group.ranks, rows)]
    problems = _request_problems(table)
    if problems:
        raise RequestMismatchError(
            f"ranks disagree on the request before step 0: {', '.join(problems.values())}; "
            f"start every rank with the same {_what_to_align(problems)}"
        )


def check_layout(config: ParallelConfig, world: Group, device: torch.device) -> None:
    """Raise the same :class:`LayoutMismatchError` on every rank of ``world`` (the default group)
    unless all ranks parsed the same layout; must run before any subgroup is created (collective)."""
    mine = torch.tensor([getattr(config, name) for name in LAYOUT_FIELDS], dtype=torch.int64, device=device)
    rows = _gather(world, "layout check", lambda: world.all_gather(mine, op="layout check"))
    values = [dict(zip(LAYOUT_FIELDS, row.tolist())) for row in rows]
    problems = [
        problem
        for name in LAYOUT_FIELDS
        if (problem := _differs(name, [(rank, v[name]) for rank, v in zip(world.ranks, values)]))
    ]
    if problems:
        same = "cfg_degree and sp_degree (--cfg-parallel, --sp)"
        if any(v["ring_degree"] != values[0]["ring_degree"] for v in values):
            same = "cfg_degree, sp_degree and ring_degree (--cfg-parallel, --ulysses, --ring)"
        raise LayoutMismatchError(
            f"ranks disagree on the parallel layout: {', '.join(problems)}; start every rank with the same "
            f"{same} under one torchrun"
        )


def _request_problems(table: list[tuple[int, int, RequestFingerprint]]) -> dict[str, str]:
    """Field -> what differs, replica scope first (a field is reported once, in its narrowest scope)."""
    problems: dict[str, str] = {}
    replicas = sorted({dp_rank for _, dp_rank, _ in table})
    for name in REPLICA_FIELDS:
        found = []
        for replica in replicas:
            members = [(rank, getattr(fp, name)) for rank, dp_rank, fp in table if dp_rank == replica]
            found.append(_differs(name, members, where=f" within replica {replica}" if len(replicas) > 1 else ""))
        if any(found):
            problems[name] = ", ".join(problem for problem in found if problem)
    for field in dataclasses.fields(RequestFingerprint):
        name = field.name
        if name in problems or (name in REPLICA_FIELDS and name != "latent_shape"):
            continue
        key = (lambda shape: shape[1:]) if name == "latent_shape" else None
        where = " beyond the batch dimension" if key else ""
        problem = _differs(name, [(rank, getattr(fp, name)) for rank, _, fp in table], key=key, where=where)
        if problem:
            problems[name] = problem
    return problems


def _what_to_align(problems: Mapping[str, str]) -> str:
    """"arguments", plus the files a rank may have read from elsewhere when those differ."""
    extra = {"params_hash": "cache params files", "model": "model"}
    things = ["arguments"] + [what for name, what in extra.items() if name in problems]
    return things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]


def _differs(
    name: str, values: list[tuple[int, Any]], *, key: Callable[[Any], Any] | None = None, where: str = ""
) -> str | None:
    """``"<name> differs<where> (rank 0: 5.0; rank 1: 4.0)"``, or None when all ``(rank, value)``
    agree (compared through ``key``); ranks with the same value are listed together."""
    if len({(key or _same)(value) for _, value in values}) <= 1:
        return None
    by_value: dict[str, list[int]] = {}
    for (rank, _), shown in zip(values, _shown([value for _, value in values])):
        by_value.setdefault(shown, []).append(rank)
    listed = "; ".join(
        f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}: {shown}"
        for shown, ranks in by_value.items()
    )
    return f"{name} differs{where} ({listed})"


def _same(value: T) -> T:
    return value


def _shown(values: list[Any]) -> list[str]:
    """Each value's repr; long ones cut to a window starting just before their first difference."""
    texts = [repr(value) for value in values]
    if max(len(text) for text in texts) <= _SHOWN_CHARS:
        return texts
    start = max(0, len(os.path.commonprefix(texts)) - _SHOWN_CHARS // 3)
    end = start + _SHOWN_CHARS
    return [("..." if start else "") + text[start:end] + ("..." if len(text) > end else "") for text in texts]


# -- a collective that says who did not answer ----------------------------------------------------


def _gather(group: Group, check: str, gather: Callable[[], list[T]]) -> list[T]:
    """Run ``gather`` over ``group``; if it fails, a one-line :class:`CollectiveError` naming the ranks
    that never reached ``check`` (each rank leaves a mark in the default store first) and the cause."""
    if group.size == 1:
        return gather()
    count = next(_CHECK_COUNTS.setdefault(check, itertools.count()))
    prefix = f"ditcache/{check}/{count}"
    _mark(f"{prefix}/{group.global_rank}")
    try:
        return gather()
    except CollectiveError as exc:
        raise CollectiveError(_no_answer(group, check, prefix, exc), exc.cause) from exc


def _no_answer(group: Group, check: str, prefix: str, exc: CollectiveError) -> str:
    cause = exc.cause or str(exc)
    missing = _missing(group, prefix)
    if missing is None:
        who = f"the exchange failed ({cause})"
    elif missing:
        listed = ", ".join(map(str, missing))
        who = f"{'rank' if len(missing) == 1 else 'ranks'} {listed} did not reach it ({cause})"
    else:
        who = f"every rank reached it but the exchange failed ({cause})"
    return (
        f"{check} over the {group.describe()} failed on rank {group.global_rank}: {who}; the first error "
        "printed by the other ranks says why"
    )


def _store() -> dist.Store | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # no default group, or a torch without it
        return None


def _mark(key: str) -> None:
    store = _store()
    if store is not None:
        try:
            store.set(key, "1")
        except RuntimeError:  # the store is gone: the gather will fail and say so
            pass


def _missing(group: Group, prefix: str) -> list[int] | None:
    """Global ranks of ``group`` whose mark is not in the store, or None if the store cannot tell."""
    store = _store()
    if store is None:
        return None
    try:
        return [rank for rank in group.ranks if not store.check([f"{prefix}/{rank}"])]
    except RuntimeError:
        return None
