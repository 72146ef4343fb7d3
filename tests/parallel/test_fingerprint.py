"""Request fingerprint and layout check: ranks started differently fail together before compute."""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable

import pytest
import torch

from ditcache.cache import AdaTaylorConfig, NoCache, NoCacheConfig
from ditcache.errors import CollectiveError, LayoutMismatchError, RequestMismatchError
from ditcache.params.loader import load_params
from ditcache.parallel import (
    ParallelGroups,
    RequestFingerprint,
    StepSync,
    SyncedCache,
    cache_description,
    cache_params,
    check_request,
    fingerprint_hash,
    init_parallel,
    model_identity,
    params_hash,
    prompt_hash,
    sigmas_hash,
)
from ditcache.parallel.testing import run_ranks, values_or_raise

FIELDS = [field.name for field in dataclasses.fields(RequestFingerprint)]


def _base() -> dict:
    """A cfg 2 request as both ranks of a 2-rank job would describe it."""
    return dict(
        seed=0,
        num_inference_steps=4,
        sigmas=sigmas_hash([1.0, 0.75, 0.5, 0.25, 0.0]),
        sigma_shift=3.0,
        guidance_scale=5.0,
        guidance_scale_2=None,
        prompt_hash=prompt_hash(["a handwritten 3"], [""]),
        num_prompts=1,
        latent_shape=(1, 4, 1, 8, 8),
        layout="cfg 2 x sp 1 x dp 1 (2 ranks)",
        cache=cache_description(AdaTaylorConfig(model_type="Reference-Digits")),
        params_hash=params_hash(load_params("Reference-Digits")),
        model=model_identity(torch.nn.Linear(2, 2)),
    )


def _altered() -> dict:
    """One other value per field, as a rank started with other arguments or files would report it."""
    params = load_params("Reference-Digits")
    return dict(
        seed=1,
        num_inference_steps=5,
        sigmas=sigmas_hash([1.0, 0.8, 0.5, 0.25, 0.0]),
        sigma_shift=5.0,
        guidance_scale=4.0,
        guidance_scale_2=2.0,
        prompt_hash=prompt_hash(["a handwritten 8"], [""]),
        num_prompts=2,
        latent_shape=(1, 4, 1, 8, 16),
        layout="cfg 1 x sp 1 x dp 2 (2 ranks)",
        cache=cache_description(AdaTaylorConfig(model_type="Reference-Digits", n_derivatives=2)),
        params_hash=params_hash(dataclasses.replace(params, thresh=params.thresh * 2)),
        model=model_identity(torch.nn.Linear(2, 2).double()),
    )


def _outcome(check: Callable[[], object]) -> tuple[str, str]:
    """('ok', '') or (error type, message) of ``check()``."""
    try:
        check()
    except (RequestMismatchError, LayoutMismatchError, CollectiveError) as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


# -- hashing helpers (one process) ----------------------------------------------------------------


def test_fingerprint_hash_is_stable_and_refuses_unstable_values():
    assert fingerprint_hash({"b": [1, 2.5], "a": "x"}) == fingerprint_hash({"a": "x", "b": (1, 2.5)})
    assert fingerprint_hash({"a": 1}) != fingerprint_hash({"a": 2})
    with pytest.raises(TypeError):
        fingerprint_hash({"a": object()})  # its repr holds an address that differs between ranks


def test_prompt_hash_tells_prompts_from_negatives_and_order():
    assert prompt_hash(["a", "b"], ["", ""]) != prompt_hash(["b", "a"], ["", ""])
    assert prompt_hash(["a"], ["b"]) != prompt_hash(["b"], ["a"])


def test_sigmas_hash_ignores_float_noise_only():
    assert sigmas_hash([1.0, 0.5]) == sigmas_hash(torch.tensor([1.0, 0.5], dtype=torch.float32).tolist())
    assert sigmas_hash([1.0, 0.5]) != sigmas_hash([1.0, 0.501])


def test_params_hash_is_the_content_not_the_file():
    params = load_params("Reference-Digits")
    moved = dataclasses.replace(params, path="/elsewhere/Reference-Digits.json", provenance={"note": "copy"})
    assert params_hash(params) == params_hash(moved)
    assert params_hash(params) != params_hash(dataclasses.replace(params, K=params.K + 1))
    assert params_hash(None) == "" and params_hash(None, params) != params_hash(params, None)


def test_cache_params_looks_through_the_step_sync_wrapper():
    cache = AdaTaylorConfig(model_type="Reference-Digits").build(10)
    synced = SyncedCache(cache, StepSync.for_groups(ParallelGroups.single()))
    assert cache_params(synced) is cache.params and cache.params.model_type == "Reference-Digits"
    assert cache_params(NoCache()) is None and cache_params(SyncedCache(NoCache(), synced.sync)) is None


def test_model_identity_is_class_dtype_and_public_config(make_tiny_wan):
    model = make_tiny_wan()
    same = make_tiny_wan(seed=1)
    same.register_to_config(_name_or_path="/another/copy")
    assert model_identity(model) == model_identity(same)
    assert model_identity(model).startswith("WanTransformer3DModel/float32/")
    assert model_identity(model) != model_identity(make_tiny_wan(num_layers=3))
    assert model_identity(model) != model_identity(make_tiny_wan().to(torch.float64))


def test_cache_description():
    assert cache_description(None) == "none"
    assert cache_description("none") == cache_description(NoCacheConfig()) == NoCacheConfig().describe()
    mapping = {"transformer_2": NoCacheConfig(), "transformer": AdaTaylorConfig(model_type="Reference-Digits")}
    assert cache_description(mapping).startswith("{transformer: ada_taylor(")


def test_one_process_passes_without_communication():
    check_request(ParallelGroups.single(), RequestFingerprint(**_base()))


def test_latent_shape_is_normalised_to_a_tuple():
    fp = RequestFingerprint(**{**_base(), "latent_shape": [1, 4, 1, 8, 8]})
    assert fp == RequestFingerprint(**_base())


# -- cfg 2 on 2 ranks: every field --------------------------------------------------------------


def _field_cases(rank: int, world: int, base: dict, altered: dict) -> dict:
    groups = init_parallel(2, 1, timeout_s=60)
    out = {"identical": _outcome(lambda: check_request(groups, RequestFingerprint(**base)))}
    for name in FIELDS:
        mine = base if rank == 0 else {**base, name: altered[name]}
        out[name] = _outcome(lambda: check_request(groups, RequestFingerprint(**mine)))
    both = base if rank == 0 else {**base, "seed": 7, "guidance_scale": 4.0}
    out["two_fields"] = _outcome(lambda: check_request(groups, RequestFingerprint(**both)))
    # rank 1 is alive but elsewhere: the error comes from the deadline, naming rank 1
    quick = dataclasses.replace(groups, world=dataclasses.replace(groups.world, timeout=datetime.timedelta(seconds=1)))
    if rank == 0:
        start = time.monotonic()
        outcome = _outcome(lambda: check_request(quick, RequestFingerprint(**base)))
        out["absent_peer"] = (*outcome, time.monotonic() - start)
    else:
        time.sleep(3)
    return out


@pytest.fixture(scope="module")
def cfg2() -> list[dict]:
    return values_or_raise(run_ranks(_field_cases, 2, _base(), _altered(), timeout_s=120))


def test_every_field_is_covered():
    assert set(_altered()) == set(FIELDS) == set(_base())


@pytest.mark.distributed
def test_identical_fingerprints_pass(cfg2):
    assert [r["identical"] for r in cfg2] == [("ok", "")] * 2


@pytest.mark.distributed
@pytest.mark.parametrize("field", FIELDS)
def test_one_differing_field_fails_every_rank_with_one_message(cfg2, field):
    outcomes = [r[field] for r in cfg2]
    assert {kind for kind, _ in outcomes} == {"RequestMismatchError"}
    message = outcomes[0][1]
    assert all(m == message for _, m in outcomes)  # every rank tells the same story
    assert "\n" not in message
    assert message.startswith(f"ranks disagree on the request before step 0: {field} differs (rank 0: ")
    assert message.count(" differs ") == 1  # that field alone
    assert "; rank 1: " in message and "start every rank with the same arguments" in message
    base, altered = repr(_base()[field]), repr(_altered()[field])
    if max(len(base), len(altered)) <= 60:
        assert f"(rank 0: {base}; rank 1: {altered})" in message


@pytest.mark.distributed
def test_long_values_are_shown_around_their_difference(cfg2):
    message = cfg2[0]["cache"][1]
    assert '(rank 0: ...", "n_derivatives": null, ' in message and '; rank 1: ...", "n_derivatives": 2, ' in message
    assert len(message) < 2 * len(_base()["cache"])
    assert "cache params files" in cfg2[0]["params_hash"][1] and "model" in cfg2[0]["model"][1]


@pytest.mark.distributed
def test_every_differing_field_is_named(cfg2):
    kind, message = cfg2[1]["two_fields"]
    assert kind == "RequestMismatchError"
    assert "seed differs (rank 0: 0; rank 1: 7), guidance_scale differs (rank 0: 5.0; rank 1: 4.0);" in message


@pytest.mark.distributed
def test_a_peer_that_never_arrives_is_named(cfg2):
    kind, message, waited = cfg2[0]["absent_peer"]
    assert kind == "CollectiveError" and "\n" not in message
    assert "request check over the world group (global ranks [0, 1]) failed on rank 0: " in message
    assert "rank 1 did not reach it (timed out after 1 s)" in message
    assert waited < 3  # the deadline, not rank 1 waking up


# -- dp 2 x cfg 2 on 4 ranks: replica scope -------------------------------------------------------


def _replica_cases(rank: int, world: int, base: dict) -> dict:
    groups = init_parallel(2, 1, timeout_s=60)
    replica = groups.dp_rank
    # what the launcher does: replica r samples its own share of the prompts with seed + r
    prompts = [["a handwritten 1"], ["a handwritten 2", "a handwritten 3"]][replica]
    own = {
        **base,
        "seed": base["seed"] + replica,
        "prompt_hash": prompt_hash(prompts, [""] * len(prompts)),
        "num_prompts": len(prompts),
        "latent_shape": (len(prompts), 4, 1, 8, 8),
        "layout": groups.config.layout,
    }
    cases = {
        "replicas_differ": own,
        "seed_within_replica": {**own, "seed": 7} if rank == 3 else own,
        "guidance_across_replicas": {**own, "guidance_scale": 4.0} if replica == 1 else own,
        "frame_size_across_replicas": {**own, "latent_shape": (2, 4, 1, 8, 16)} if replica == 1 else own,
    }
    return {name: _outcome(lambda: check_request(groups, RequestFingerprint(**fp))) for name, fp in cases.items()}


@pytest.fixture(scope="module")
def dp2_cfg2() -> list[dict]:
    return values_or_raise(run_ranks(_replica_cases, 4, _base(), timeout_s=120))


def _same_error(outcomes: list[dict], case: str) -> str:
    assert {r[case][0] for r in outcomes} == {"RequestMismatchError"}
    assert len({r[case][1] for r in outcomes}) == 1
    return outcomes[0][case][1]


@pytest.mark.distributed
def test_replicas_may_differ_in_seed_and_prompts(dp2_cfg2):
    assert [r["replicas_differ"] for r in dp2_cfg2] == [("ok", "")] * 4


@pytest.mark.distributed
def test_seed_must_agree_within_a_replica(dp2_cfg2):
    message = _same_error(dp2_cfg2, "seed_within_replica")  # replica 0's ranks fail too
    assert ": seed differs within replica 1 (rank 2: 1; rank 3: 7); start every rank" in message


@pytest.mark.distributed
def test_the_rest_must_agree_across_replicas(dp2_cfg2):
    message = _same_error(dp2_cfg2, "guidance_across_replicas")
    assert ": guidance_scale differs (ranks 0, 1: 5.0; ranks 2, 3: 4.0); " in message
    message = _same_error(dp2_cfg2, "frame_size_across_replicas")
    assert ": latent_shape differs beyond the batch dimension (ranks 0, 1: (1, 4, 1, 8, 8); " in message
    assert "ranks 2, 3: (2, 4, 1, 8, 16))" in message


# -- layout ---------------------------------------------------------------------------------------


def _layout_cases(rank: int, world: int) -> dict:
    def start(cfg_degree: int, sp_degree: int) -> tuple[str, str]:
        return _outcome(lambda: init_parallel(cfg_degree, sp_degree, timeout_s=60))

    out = {
        "cfg_1_vs_2": start(2 if rank == 0 else 1, 1),
        "cfg_vs_sp": start(2 if rank == 0 else 1, 1 if rank == 0 else 2),
    }
    groups = init_parallel(2, 1, timeout_s=60)  # the same layout on both ranks passes
    if rank == 0:  # rank 1 returns now and closes its connections
        out["peer_gone"] = _outcome(lambda: check_request(groups, RequestFingerprint(**_base())))
    return out


@pytest.fixture(scope="module")
def layouts() -> list[dict]:
    return values_or_raise(run_ranks(_layout_cases, 2, timeout_s=120))


@pytest.mark.distributed
def test_layout_mismatch_fails_every_rank_naming_both_values(layouts):
    assert {r["cfg_1_vs_2"][0] for r in layouts} == {"LayoutMismatchError"}
    message = layouts[0]["cfg_1_vs_2"][1]
    assert message == layouts[1]["cfg_1_vs_2"][1]
    assert message == (
        "ranks disagree on the parallel layout: cfg_degree differs (rank 0: 2; rank 1: 1), "
        "dp_degree differs (rank 0: 1; rank 1: 2); start every rank with the same cfg_degree and sp_degree "
        "(--cfg-parallel, --sp) under one torchrun"
    )
    message = layouts[1]["cfg_vs_sp"][1]
    assert "cfg_degree differs (rank 0: 2; rank 1: 1), sp_degree differs (rank 0: 1; rank 1: 2);" in message


@pytest.mark.distributed
def test_a_peer_that_left_is_named(layouts):
    kind, message = layouts[0]["peer_gone"]
    assert kind == "CollectiveError"
    assert "rank 1 did not reach it (" in message, message
