"""The family registry: built-in families are discovered, a directory's family is detected from its
model_index.json (and loaded), an outside family is found like a built-in one, and every family's
pipeline takes the same request arguments."""

from __future__ import annotations

import inspect
import json

import pytest
from conftest import write_tiny_digit_model, write_tiny_hunyuan_dir, write_tiny_qwen_dir

from ditcache.errors import UnknownModelError
from ditcache.families import Family, family, family_for_dir, known_families, load_pipeline, register_family, registry
from ditcache.families.hunyuan_video.pipeline import HunyuanVideoPipeline
from ditcache.families.qwen_image.pipeline import QwenImagePipeline
from ditcache.families.wan.pipeline import Wan22Pipeline, WanPipeline
from ditcache.models import MODELS_DIR, REFERENCE_DIGITS, REFERENCE_DIGITS_MOE
from ditcache.params.userdir import SHIPPED_PARAMS_DIR

BUILTIN = {"wan", "hunyuan_video", "qwen_image"}
# The request arguments every pipeline takes, in this order, before its family's keyword-only extras.
UNIFIED = (
    "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "sigma_shift", "seed", "height", "width",
    "num_frames", "image", "cache", "enable_ada_taylor_cache", "ada_taylor_n_derivatives",
    "ada_taylor_taylor_threshold", "model_type", "output_type", "progress",
)


def test_the_registry_discovers_the_builtin_families():
    assert BUILTIN <= set(known_families())
    for name in BUILTIN:
        record = family(name)
        assert record.name == name and record.adapter_class.family == name
        assert record.transformer == record.transformer_class.__name__
        assert record.ulysses_processors, f"{name} names no Ulysses processor"
        assert all(inspect.isclass(cls) for cls in record.pipeline_classes)
    assert [name for name in sorted(BUILTIN) if family(name).image_model] == ["qwen_image"]
    with pytest.raises(UnknownModelError, match="unknown model family 'sd15'; known families: hunyuan_video"):
        family("sd15")


def test_every_shipped_params_file_belongs_to_exactly_one_family():
    for path in sorted(SHIPPED_PARAMS_DIR.glob("*.json")):
        model_type = json.loads(path.read_text())["model_type"]
        owners = [name for name in BUILTIN if model_type in family(name).model_types]
        assert len(owners) == 1, (model_type, owners)


@pytest.mark.parametrize(
    "write, name, cls, model_type",
    [
        (write_tiny_digit_model, "wan", WanPipeline, None),
        (write_tiny_hunyuan_dir, "hunyuan_video", HunyuanVideoPipeline, "HunyuanVideo-T2V"),
        (write_tiny_qwen_dir, "qwen_image", QwenImagePipeline, "Qwen-Image"),
    ],
    ids=["wan", "hunyuan_video", "qwen_image"],
)
def test_load_pipeline_detects_the_family_of_a_saved_directory(tmp_path, write, name, cls, model_type):
    root = write(tmp_path)
    assert family_for_dir(root).name == name
    pipe = load_pipeline(root)
    assert type(pipe) is cls and pipe.settings.model_type == model_type


@pytest.mark.parametrize("root, cls", [(REFERENCE_DIGITS, WanPipeline), (REFERENCE_DIGITS_MOE, Wan22Pipeline)])
def test_the_bundled_reference_models_are_wan(root, cls):
    if not (root / "model_index.json").is_file():
        pytest.skip(f"the bundled reference model is not present under {MODELS_DIR}")
    assert family_for_dir(root).name == "wan"
    assert type(load_pipeline(root)) is cls


def test_detection_by_diffusers_pipeline_class_and_unknown_models(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    assert family_for_dir(tmp_path).name == "qwen_image"
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnknownModelError, match="no model family recognises _class_name 'FluxPipeline'"):
        load_pipeline(tmp_path)


def load_outside(model_dir, *, device, dtype, parallel):
    """The loader of the test's outside family: what it was called with."""
    return ("outside pipeline", model_dir, device, dtype, parallel)


def test_a_family_registered_from_outside_is_detected_and_loaded(tmp_path, monkeypatch):
    known_families()  # the built-ins are in before the registry is swapped for a copy
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    record = Family(
        name="tiny_outside",
        transformer="TinyOutsideTransformer",
        diffusers_pipelines=("TinyOutsidePipeline",),
        adapter="no_such_module:Adapter",
        pipelines=(),
        loader=f"{__name__}:load_outside",
        stack=("blocks",),
    )
    assert register_family(record) is record and register_family(record) is record
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "TinyOutsidePipeline"}))
    assert family_for_dir(tmp_path) is record and "tiny_outside" in known_families()
    assert load_pipeline(tmp_path, device="meta")[:3] == ("outside pipeline", tmp_path, "meta")
    with pytest.raises(ValueError, match="a different family named 'tiny_outside' is already registered"):
        register_family(Family("tiny_outside", "Other", (), "m:A", (), "m:load", ("blocks",)))


@pytest.mark.parametrize("cls", [WanPipeline, Wan22Pipeline, HunyuanVideoPipeline, QwenImagePipeline])
def test_every_pipeline_takes_the_unified_request_arguments(cls):
    params = list(inspect.signature(cls.__call__).parameters.values())[1:]
    common = params[: len(UNIFIED)]
    assert tuple(p.name for p in common) == UNIFIED
    reference = list(inspect.signature(WanPipeline.__call__).parameters.values())[1 : len(UNIFIED) + 1]
    assert [(p.kind, p.default) for p in common] == [(p.kind, p.default) for p in reference]
    assert common[UNIFIED.index("enable_ada_taylor_cache")].kind is inspect.Parameter.KEYWORD_ONLY
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[len(UNIFIED):])
