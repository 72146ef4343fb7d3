"""Load a diffusers-format model directory (``--model-dir``) without touching the network.

Layout (``model_index.json`` names each part as ``[library, class]``, or ``null`` when absent)::

    model_index.json   parts, optional "boundary_ratio" (Wan2.2) and an optional "ditcache" section
    transformer/       config.json + weights (transformer_2/ too for Wan2.2's low-noise expert)
    text_encoder/      the prompt encoder (UMT5 for Wan, DigitPromptEncoder for the reference model)
    tokenizer/         its tokenizer
    vae/               AutoencoderKLWan, or "vae": null for a model that denoises pixels directly
    scheduler/         scheduler_config.json: the diffusers scheduler every request builds afresh
    image_encoder/     optional (Wan2.1 I2V/FL2V): transformers CLIPVisionModel config + weights
    image_processor/   optional, with image_encoder: its CLIPImageProcessor (preprocessor_config.json)

The ``"ditcache"`` section states what diffusers' index cannot: ``latent_space`` ("pixel" or "vae"),
the default request (``height``, ``width``, ``num_frames``, ``default_steps``,
``default_shift``, ``default_guidance_scale``) and the params ``model_type`` of the cache curves.

The scheduler config is handed to the pipeline as read (:attr:`LoadedModel.scheduler_config`): each
request builds its own diffusers scheduler from it with the request's shift
(``ditcache.runtime.scheduler``); its shift (``flow_shift`` or ``shift``) is the default shift.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditcache.errors import ParamsError, UnknownModelError
from ditcache.runtime.text_encoders import TextEncoder, UMT5TextEncoder

LATENT_SPACES = ("pixel", "vae")
EXPERT_PARTS = ("transformer", "transformer_2")

# What each part's folder must hold, for the error that names a missing one.
_PART_FILES = {
    "transformer": ("config.json", "a diffusers transformer config and its weights (*.safetensors)"),
    "transformer_2": ("config.json", "the low-noise expert's diffusers config and weights (*.safetensors)"),
    "text_encoder": (None, "the prompt encoder's config and weights"),
    "tokenizer": (None, "the tokenizer files (tokenizer.json or tokenizer_config.json + vocabulary)"),
    "vae": ("config.json", "an AutoencoderKLWan config and its weights (*.safetensors)"),
    "scheduler": ("scheduler_config.json", "the scheduler config (its 'shift' or 'flow_shift' is the default shift)"),
    "image_encoder": ("config.json", "a transformers CLIPVisionModel config and its weights (*.safetensors)"),
    "image_processor": ("preprocessor_config.json", "the CLIPImageProcessor's preprocessor_config.json"),
}
IMAGE_PARTS = {
    "image_encoder": ("transformers", "CLIPVisionModel"),
    "image_processor": ("transformers", "CLIPImageProcessor"),
}
# safetensors' names of the float types a checkpoint may be stored in.
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@dataclass(frozen=True)
class ModelSettings:
    """Model-level facts and request defaults, read from ``model_index.json``."""

    latent_space: str
    height: int
    width: int
    num_frames: int
    default_steps: int
    default_shift: float | None  # None: the family computes it per request (Qwen-Image: by resolution)
    default_guidance_scale: float
    model_type: str | None
    boundary_ratio: float | None


@dataclass
class LoadedModel:
    """Everything a pipeline is built from."""

    path: Path
    index: dict[str, Any]
    settings: ModelSettings
    transformers: dict[str, torch.nn.Module]  # "transformer" (and "transformer_2" for two experts)
    text_encoder: TextEncoder
    vae: torch.nn.Module | None
    image_encoder: torch.nn.Module | None = None  # CLIPVisionModel (Wan2.1 I2V/FL2V)
    image_processor: Any | None = None  # its CLIPImageProcessor
    scheduler_config: dict[str, Any] | None = None  # scheduler/scheduler_config.json (None: the family's)


def read_model_index(model_dir: str | Path) -> dict[str, Any]:
    """Parse ``model_index.json``; a missing directory or file is a ParamsError saying what is expected."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ParamsError(f"model directory {root} does not exist (expected a diffusers-format folder)")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ParamsError(
            f"model directory {root} has no model_index.json: it should list the parts "
            "(transformer, text_encoder, tokenizer, vae, scheduler) as [library, class] pairs"
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise ParamsError(f"{index_path} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise ParamsError(f"{index_path} must hold a JSON object")
    return index


def part_spec(index: dict[str, Any], part: str) -> tuple[str, str] | None:
    """``(library, class)`` of a part, or None when the index leaves it out or sets it to null."""
    spec = index.get(part)
    if spec is None:
        return None
    if not (isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(s, str) for s in spec)):
        raise ParamsError(f"model_index.json entry {part!r} must be [library, class] or null, got {spec!r}")
    return spec[0], spec[1]


def check_part(root: Path, part: str) -> Path:
    """The part's folder, after checking it exists with its config file."""
    folder = root / part
    required, what = _PART_FILES[part]
    if not folder.is_dir():
        raise ParamsError(f"model directory {root} is missing the folder {part}/: it should contain {what}")
    if required is not None and not (folder / required).is_file():
        raise ParamsError(f"model directory {root} is missing {part}/{required}: {part}/ should contain {what}")
    if required is None and not any(folder.iterdir()):
        raise ParamsError(f"model directory {root}: folder {part}/ is empty; it should contain {what}")
    return folder


def read_settings(root: Path, index: dict[str, Any]) -> ModelSettings:
    """Merge the ``ditcache`` section, the scheduler config and Wan's defaults."""
    section = index.get("ditcache") or {}
    if not isinstance(section, dict):
        raise ParamsError(f"{root}/model_index.json: 'ditcache' must be an object, got {section!r}")
    has_vae = part_spec(index, "vae") is not None
    latent_space = section.get("latent_space", "vae" if has_vae else None)
    if latent_space not in LATENT_SPACES:
        raise ParamsError(
            f"{root}/model_index.json: ditcache.latent_space must be one of {LATENT_SPACES} "
            f"(a model without a vae must say 'pixel'), got {latent_space!r}"
        )
    if latent_space == "vae" and not has_vae:
        raise ParamsError(f"{root}/model_index.json: latent_space 'vae' but the 'vae' part is null")
    pixel = latent_space == "pixel"

    shift = section.get("default_shift")
    if shift is None:
        config = scheduler_config(root, index)
        shift = config.get("shift", config.get("flow_shift"))

    return ModelSettings(
        latent_space=latent_space,
        height=int(section.get("height", 480)),
        width=int(section.get("width", 832)),
        num_frames=int(section.get("num_frames", 1 if pixel else 81)),
        default_steps=int(section.get("default_steps", 50)),
        default_shift=float(shift if shift is not None else 5.0),
        default_guidance_scale=float(section.get("default_guidance_scale", 5.0)),
        model_type=section.get("model_type"),
        boundary_ratio=index.get("boundary_ratio"),
    )


def _device_map(device: str | torch.device | None) -> dict[str, torch.device] | None:
    """The ``device_map`` that makes ``from_pretrained`` place each weight on ``device`` as it is read.

    None for the CPU, where the libraries load anyway, so CPU models carry no dispatch bookkeeping.
    """
    if device is None or torch.device(device).type == "cpu":
        return None
    return {"": torch.device(device)}


def _load_diffusers_part(
    root: Path, part: str, spec: tuple[str, str], dtype: torch.dtype, device: str | torch.device | None
) -> torch.nn.Module:
    library, class_name = spec
    if library != "diffusers":
        raise UnknownModelError(f"{root}: part {part!r} is {library}.{class_name}; only diffusers classes load here")
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise UnknownModelError(f"{root}: part {part!r} names diffusers.{class_name}, which this diffusers lacks")
    return load_diffusers_model(cls, check_part(root, part), dtype, device=device)


def _check_diffusers_weights(folder: Path) -> None:
    """Name the missing weights before diffusers does: its error speaks of downloads and the Hub."""
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

    if not any(folder.glob("*.safetensors")):
        raise ParamsError(f"{folder} has no *.safetensors weights (only safetensors checkpoints are loaded)")
    if not ((folder / SAFETENSORS_WEIGHTS_NAME).is_file() or (folder / SAFE_WEIGHTS_INDEX_NAME).is_file()):
        raise ParamsError(
            f"{folder} has neither {SAFETENSORS_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}: "
            "save the model with diffusers' save_pretrained"
        )


def _stored_dtype(folder: Path) -> torch.dtype | None:
    """The dtype holding most of the checkpoint's bytes, from the safetensors headers alone (None if exotic)."""
    sizes: Counter[str] = Counter()
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                sizes[entry["dtype"]] += end - start
    return _SAFETENSORS_DTYPES.get(sizes.most_common(1)[0][0]) if sizes else None


def _reads_whole_shards(folder: Path, dtype: torch.dtype, device: str | torch.device | None) -> bool:
    """Whether to read each shard into memory rather than map it (diffusers' ``disable_mmap``).

    safetensors maps a shard and hands out views of the mapping, so a weight loaded unchanged (an
    fp32-kept module of an fp32 checkpoint) keeps the whole shard, and every page cast from it,
    resident: an fp32 checkpoint loaded into bf16 on the CPU would peak at weights plus the entire
    checkpoint. Read shards are freed once cast. A checkpoint already in ``dtype`` is mapped and used
    in place, without a copy; off the CPU every weight is copied to the device, freeing the mapping.
    """
    return _device_map(device) is None and _stored_dtype(folder) != dtype


def _unloaded(model: torch.nn.Module) -> list[str]:
    """Weights still on the meta device: diffusers trusts a shard index, so a weight the index lists but
    its shard lacks is left unloaded without being reported missing."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, tensor in tensors if tensor.device.type == "meta"]


def load_diffusers_model(
    cls: type, folder: Path, dtype: torch.dtype, *, device: str | torch.device | None = None
) -> torch.nn.Module:
    """Load ``cls`` from ``folder`` (one safetensors file or shards) in ``dtype``, onto ``device``.

    diffusers builds the model on the meta device and reads one shard at a time, casting each weight
    to ``dtype`` as it is placed: the peak is the loaded weights plus at most about one shard, where
    building a random fp32 model first and loading the whole state dict beside it took three to four
    times the bf16 weights. Modules the class keeps in fp32 (Wan's rope, time embedder, norms) stay
    fp32, because they lose precision in half types.
    """
    _check_diffusers_weights(folder)
    model, info = cls.from_pretrained(
        str(folder),
        torch_dtype=dtype,
        low_cpu_mem_usage=True,
        device_map=_device_map(device),
        local_files_only=True,
        use_safetensors=True,
        disable_mmap=_reads_whole_shards(folder, dtype, device),
        output_loading_info=True,
    )
    missing, unexpected = sorted({*info["missing_keys"], *_unloaded(model)}), info["unexpected_keys"]
    if missing or unexpected:
        raise ParamsError(
            f"{folder}: the weights do not match config.json: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model.eval()


def load_text_encoder(
    root: Path, index: dict[str, Any], dtype: torch.dtype, *, device: str | torch.device | None = None
) -> TextEncoder:
    """Dispatch on the text_encoder entry of ``model_index.json``; the encoder ends up on ``device``."""
    spec = part_spec(index, "text_encoder")
    if spec is None:
        raise ParamsError(f"model directory {root}: model_index.json has no text_encoder part")
    te_dir = check_part(root, "text_encoder")
    tok_dir = check_part(root, "tokenizer")
    if spec == ("transformers", "UMT5EncoderModel"):
        return UMT5TextEncoder.from_pretrained(te_dir, tok_dir, dtype=dtype, device_map=_device_map(device))
    if spec == ("ditcache", "DigitPromptEncoder"):
        from ditcache.runtime.reference import DigitPromptEncoder

        # Tens of kilobytes: loaded on the CPU in fp32, as it was trained, then moved.
        return DigitPromptEncoder.from_pretrained(root).to(device or "cpu")
    raise UnknownModelError(
        f"{root}: unsupported text_encoder {spec[0]}.{spec[1]}; supported: "
        "transformers.UMT5EncoderModel, ditcache.DigitPromptEncoder"
    )


def load_image_parts(
    root: Path, index: dict[str, Any], dtype: torch.dtype, *, device: str | torch.device | None = None
) -> tuple[Any, Any]:
    """The CLIP ``image_encoder`` (on ``device``) and ``image_processor``; (None, None) if the index lists neither."""
    specs = {part: part_spec(index, part) for part in IMAGE_PARTS}
    listed = [part for part, spec in specs.items() if spec is not None]
    if not listed:
        return None, None
    if len(listed) == 1:
        other = next(part for part in IMAGE_PARTS if part not in listed)
        raise ParamsError(
            f"model directory {root}: model_index.json lists {listed[0]} but not {other}; both are needed"
        )
    for part, spec in specs.items():
        if spec != IMAGE_PARTS[part]:
            raise UnknownModelError(
                f"{root}: unsupported {part} {spec[0]}.{spec[1]}; supported: {'.'.join(IMAGE_PARTS[part])}"
            )
    from transformers import CLIPImageProcessor, CLIPVisionModel

    encoder_dir = check_part(root, "image_encoder")
    if not any(encoder_dir.glob("*.safetensors")):
        raise ParamsError(f"{encoder_dir} has no *.safetensors weights (only safetensors checkpoints are loaded)")
    encoder = CLIPVisionModel.from_pretrained(
        str(encoder_dir), dtype=dtype, device_map=_device_map(device), local_files_only=True, use_safetensors=True
    ).eval()
    processor = CLIPImageProcessor.from_pretrained(str(check_part(root, "image_processor")), local_files_only=True)
    return encoder, processor


def scheduler_config(root: Path, index: dict[str, Any]) -> dict[str, Any]:
    """The directory's ``scheduler/scheduler_config.json`` ({} when the index names no scheduler).

    The class is the config's ``_class_name``, else the index's scheduler entry (the class diffusers'
    ``from_pretrained`` would build); the two must agree when both are given."""
    spec = part_spec(index, "scheduler")
    if spec is None:
        return {}
    path = check_part(root, "scheduler") / "scheduler_config.json"
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ParamsError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ParamsError(f"{path} must hold a JSON object")
    named = config.setdefault("_class_name", spec[1])
    if named != spec[1]:
        raise ParamsError(
            f"{root}: model_index.json names the scheduler {spec[1]} but {path.name} is a {named}; make them agree"
        )
    return config


def load_transformer_and_vae(
    root: Path, transformer_class: type, vae_class: type, dtype: torch.dtype, device: str | torch.device
) -> tuple[dict[str, Any], torch.nn.Module, torch.nn.Module | None]:
    """``(model_index, transformer, vae or None)`` of a one-transformer directory (HunyuanVideo,
    Qwen-Image), each part straight onto ``device``; the VAE in fp32 because it makes the frames."""
    index = read_model_index(root)
    transformer = load_diffusers_model(transformer_class, check_part(root, "transformer"), dtype, device=device)
    vae = None
    if part_spec(index, "vae") is not None:
        vae = load_diffusers_model(vae_class, check_part(root, "vae"), torch.float32, device=device)
    return index, transformer, vae


def load_model_dir(
    model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load every part named by ``model_index.json`` from local files, each straight onto ``device``."""
    root = Path(model_dir)
    index = read_model_index(root)
    settings = read_settings(root, index)

    transformers: dict[str, torch.nn.Module] = {}
    for part in EXPERT_PARTS:
        spec = part_spec(index, part)
        if spec is not None:
            transformers[part] = _load_diffusers_part(root, part, spec, dtype, device)
    if "transformer" not in transformers:
        raise ParamsError(f"model directory {root}: model_index.json has no transformer part")

    vae_spec = part_spec(index, "vae")
    # The VAE decodes in fp32: its output is the image, and it is run once per request.
    vae = None if vae_spec is None else _load_diffusers_part(root, "vae", vae_spec, torch.float32, device)

    text_encoder = load_text_encoder(root, index, dtype, device=device)
    image_encoder, image_processor = load_image_parts(root, index, dtype, device=device)
    scheduler = scheduler_config(root, index) or None
    return LoadedModel(
        root, index, settings, transformers, text_encoder, vae, image_encoder, image_processor, scheduler
    )
