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

import copy
import json
import mmap
import re
from collections import Counter
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditcache.errors import ParamsError, UnknownModelError
from ditcache.runtime.scheduler import config_shift
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


def read_settings(root: Path, index: dict[str, Any], scheduler: dict[str, Any] | None) -> ModelSettings:
    """Merge the ``ditcache`` section, the scheduler config (``scheduler``, as read by
    :func:`scheduler_config`; its shift is the default shift) and Wan's defaults."""
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
    if shift is None and scheduler is not None:
        shift = config_shift(scheduler)

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


def _checkpoint_files(folder: Path) -> list[Path]:
    """The files ``from_pretrained`` reads: the shards the index names (sorted, as diffusers orders them),
    else the single weights file."""
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

    index_path = folder / SAFE_WEIGHTS_INDEX_NAME
    if not index_path.is_file():
        return [folder / SAFETENSORS_WEIGHTS_NAME]
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ParamsError(f"{index_path} is not a shard index (a JSON object with a 'weight_map'): {exc}") from exc
    files = [folder / name for name in sorted(set(weight_map.values()))]
    absent = [file.name for file in files if not file.is_file()]
    if absent:
        raise ParamsError(f"{folder}: {index_path.name} names shards that are not there: {absent[:3]}")
    return files


def _safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts.

    The format: an 8-byte little-endian header length, that many bytes of JSON, then the tensors'
    bytes, each at ``data_offsets`` (start, end) counted from the end of the header.
    """
    with file.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _stored_dtype(folder: Path) -> torch.dtype | None:
    """The dtype holding most of the checkpoint's bytes, from the safetensors headers alone (None if exotic)."""
    sizes: Counter[str] = Counter()
    for file in _checkpoint_files(folder):
        for entry in _safetensors_header(file)[0].values():
            start, end = entry["data_offsets"]
            sizes[entry["dtype"]] += end - start
    return _SAFETENSORS_DTYPES.get(sizes.most_common(1)[0][0]) if sizes else None


def _streams_weights(folder: Path, dtype: torch.dtype, device: str | torch.device | None) -> bool:
    """Whether to read the weights one tensor at a time (:func:`_load_streamed`) rather than through
    ``from_pretrained``'s mapped shards.

    A checkpoint already in ``dtype`` is mapped and its weights are views of the mapping, used in place
    without a copy: nothing beats that. One that must be cast on the CPU is streamed: a mapped shard
    stays resident behind the weights cast from it, and behind its fp32-kept weights for good, so
    ``from_pretrained`` would peak at the weights plus a whole shard (the whole checkpoint when it is
    one file). Off the CPU ``from_pretrained`` copies every weight to the device and drops each shard's
    mapping once the shard is placed, so the host holds at most one shard's clean, file-backed pages.
    """
    return _device_map(device) is None and _stored_dtype(folder) != dtype


# safetensors' dtype names; the 8-bit floats and wide unsigned ints only where this torch has them.
_STREAMED_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **{name: getattr(torch, attr) for name, attr in (
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
        ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
    ) if hasattr(torch, attr)},
}


class _StreamedCheckpoint(MutableMapping):
    """A checkpoint's tensors by name, each read from its file only when looked up.

    Iterating ``items()`` (what diffusers' ``load_model_dict_into_meta`` does) reads one tensor at a
    time, in file order, and keeps none: the caller's cast copy is all that stays. Each tensor is read
    into an anonymous mapping of its own, returned to the system as soon as the tensor is freed; read
    into heap memory, the freed fp32 buffers left holes between the bf16 weights that the process
    kept (0.45 GB over the 2.85 GB Wan2.1-1.3B weights). Tensors assigned in
    (``_fix_state_dict_keys_on_load`` renaming old attention keys) are held as given.

    Why not safetensors' own readers: ``load_file`` and ``safe_open`` map the whole file, and
    ``get_tensor`` returns views of that mapping. Every page read stays resident while the file is
    open, so casting a file tensor by tensor under one ``safe_open`` still peaks at the weights plus the
    whole file, and a weight loaded without a cast (an fp32-kept module of an fp32 checkpoint) keeps
    the mapping alive after it is closed. A plain read at the header's offsets costs one tensor. The
    header is still checked by safetensors (``safe_open`` validates the offsets against the file and
    reads no tensor) before any offset is trusted.
    """

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, tuple[Path, int, int, torch.dtype, list[int]] | torch.Tensor] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt"):
                    pass  # raises on a malformed header or offsets outside the file
            except Exception as exc:  # safetensors' own error type, or OSError
                raise ParamsError(f"{file} is not a readable safetensors file: {exc}") from exc
            header, data_start = _safetensors_header(file)
            for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                dtype = _STREAMED_DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise ParamsError(f"{file}: tensor {name!r} has dtype {entry['dtype']}, which is not loaded")
                start, end = entry["data_offsets"]
                self._where[name] = (file, data_start + start, end - start, dtype, entry["shape"])

    def __getitem__(self, name: str) -> torch.Tensor:
        where = self._where[name]
        if isinstance(where, torch.Tensor):
            return where
        file, offset, size, dtype, shape = where
        if not size:
            return torch.empty(shape, dtype=dtype)
        buffer = mmap.mmap(-1, size)  # unmapped when the last tensor using it is freed
        with file.open("rb", buffering=0) as handle, memoryview(buffer) as view:
            handle.seek(offset)
            done = 0
            while done < size:  # one read() returns at most ~2 GiB
                count = handle.readinto(view[done:])
                if not count:
                    raise ParamsError(f"{file} ends inside tensor {name!r}: the file is truncated")
                done += count
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self._where[name] = tensor

    def __delitem__(self, name: str) -> None:
        del self._where[name]

    def __contains__(self, name: object) -> bool:
        return name in self._where  # without reading the tensor, as Mapping's default would

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._where))

    def __len__(self) -> int:
        return len(self._where)


def _load_streamed(cls: type, folder: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, list[str]]]:
    """``cls.from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=True)`` on the CPU, reading one
    tensor at a time: the peak is the loaded weights plus one checkpoint tensor and its cast copy.

    The steps are ``from_pretrained``'s own: the config read by ``load_config``, the model built by
    ``from_config`` on the meta device under ``dtype`` as the default dtype (``init_empty_weights``,
    ``no_init_weights``), the old attention keys of a single-file checkpoint renamed by
    ``_fix_state_dict_keys_on_load``, and every weight cast and placed by diffusers'
    ``load_model_dict_into_meta`` (``_keep_in_fp32_modules`` in fp32, the shapes checked, accelerate's
    ``set_module_tensor_to_device``). Only the source of the tensors differs
    (:class:`_StreamedCheckpoint`). Returns the model and its missing and unexpected keys.
    """
    from accelerate import init_empty_weights
    from diffusers.models.model_loading_utils import load_model_dict_into_meta
    from diffusers.models.modeling_utils import no_init_weights

    files = _checkpoint_files(folder)
    checkpoint = _StreamedCheckpoint(files)
    config = copy.deepcopy(cls.load_config(str(folder), local_files_only=True))
    default_dtype = cls._set_default_torch_dtype(dtype)
    try:
        with no_init_weights(), init_empty_weights():
            model = cls.from_config(config)
    finally:
        torch.set_default_dtype(default_dtype)
    if len(files) == 1:
        model._fix_state_dict_keys_on_load(checkpoint)

    expected = set(model.state_dict())
    unexpected = [name for name in checkpoint if name not in expected]
    missing = sorted(expected.difference(checkpoint))
    for name in unexpected:
        del checkpoint[name]  # never read
    for pattern in cls._keys_to_ignore_on_load_unexpected or []:
        unexpected = [name for name in unexpected if re.search(pattern, name) is None]

    keep_in_fp32 = cls._keep_in_fp32_modules
    if keep_in_fp32 is not None and not isinstance(keep_in_fp32, list):
        keep_in_fp32 = [keep_in_fp32]
    load_model_dict_into_meta(
        model, checkpoint, dtype=dtype, model_name_or_path=str(folder), keep_in_fp32_modules=keep_in_fp32 or []
    )
    model.register_to_config(_name_or_path=str(folder))
    return model, {"missing_keys": missing, "unexpected_keys": unexpected}


def _unloaded(model: torch.nn.Module) -> list[str]:
    """Weights still on the meta device: diffusers trusts a shard index, so a weight the index lists but
    its shard lacks is left unloaded without being reported missing."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, tensor in tensors if tensor.device.type == "meta"]


def load_diffusers_model(
    cls: type, folder: Path, dtype: torch.dtype, *, device: str | torch.device | None = None
) -> torch.nn.Module:
    """Load ``cls`` from ``folder`` (one safetensors file or shards) in ``dtype``, onto ``device``.

    The model is built on the meta device and each weight is cast to ``dtype`` as it is placed, so no
    random-init fp32 model ever exists beside the weights. On the CPU the peak is about the loaded
    weights plus one tensor, for any shard layout: a checkpoint already in ``dtype`` goes through
    diffusers' ``from_pretrained``, which maps each shard and uses its tensors in place, and one that
    is cast is read one tensor at a time (:func:`_load_streamed`). Onto an accelerator
    ``from_pretrained`` copies each weight to the device; the host holds one mapped shard at a time.
    The model is the one ``from_pretrained`` gives: modules the class keeps in fp32 (Wan's rope, time
    embedder, norms) stay fp32, because they lose precision in half types.
    """
    _check_diffusers_weights(folder)
    if _streams_weights(folder, dtype, device):
        model, info = _load_streamed(cls, folder, dtype)
    else:
        model, info = cls.from_pretrained(
            str(folder),
            torch_dtype=dtype,
            low_cpu_mem_usage=True,
            device_map=_device_map(device),
            local_files_only=True,
            use_safetensors=True,
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
    scheduler = scheduler_config(root, index) or None
    settings = read_settings(root, index, scheduler)

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
    return LoadedModel(
        root, index, settings, transformers, text_encoder, vae, image_encoder, image_processor, scheduler
    )
