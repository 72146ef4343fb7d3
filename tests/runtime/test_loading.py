"""Checkpoints load through diffusers' ``from_pretrained``: exact weights, no fp32 model, fp32-kept modules."""

from __future__ import annotations

import functools
import gc
from pathlib import Path

import pytest
import torch
from conftest import tiny_hunyuan, tiny_qwen, tiny_wan
from diffusers import (
    AutoencoderKLWan,
    HunyuanVideoTransformer3DModel,
    QwenImageTransformer2DModel,
    WanTransformer3DModel,
)
from safetensors.torch import load_file, save_file

from ditcache.errors import ParamsError
from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE
from ditcache.runtime import loading
from ditcache.runtime.loading import load_diffusers_model, load_model_dir
from ditcache.runtime.reference import DigitPromptEncoder

from bench.load_memory import legacy_load

KEEP_FP32 = WanTransformer3DModel._keep_in_fp32_modules
MAPS = Path("/proc/self/maps")


def _kept_in_fp32(name: str) -> bool:
    return any(module in name.split(".") for module in KEEP_FP32)


def _shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))


@pytest.fixture
def sharded_wan(tmp_path, make_tiny_wan) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny Wan transformer saved in fp32 as several shards, and its state dict."""
    model = make_tiny_wan(seed=3)
    model.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    return tmp_path / "transformer", model.state_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sharded_checkpoint_loads_the_saved_weights(sharded_wan, dtype):
    folder, saved = sharded_wan
    assert len(_shard_files(folder)) >= 2
    model = load_diffusers_model(WanTransformer3DModel, folder, dtype)
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys()
    for name, tensor in loaded.items():
        want = torch.float32 if _kept_in_fp32(name) else dtype
        assert tensor.dtype == want, name
        assert torch.equal(tensor, saved[name].to(want)), name
    assert not model.training


def test_bf16_target_never_builds_an_fp32_model(sharded_wan, monkeypatch):
    """The model is constructed on the meta device: no random-init fp32 copy exists beside the weights."""
    folder, _ = sharded_wan
    built: list[set[tuple[str, torch.dtype]]] = []
    init = WanTransformer3DModel.__init__

    @functools.wraps(init)
    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append({(p.device.type, p.dtype) for p in self.parameters()})

    monkeypatch.setattr(WanTransformer3DModel, "__init__", recording_init)
    model = load_diffusers_model(WanTransformer3DModel, folder, torch.bfloat16)
    assert len(built) == 1 and {device for device, _ in built[0]} == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def _mapped(folder: Path) -> bool:
    """Whether any of ``folder``'s files is still memory-mapped by this process."""
    return any(line.rstrip().endswith(".safetensors") and str(folder) in line for line in MAPS.read_text().splitlines())


@pytest.mark.skipif(not MAPS.exists(), reason="reads Linux's /proc/self/maps")
def test_shards_are_mapped_only_when_used_in_place(sharded_wan, tmp_path, make_tiny_wan):
    """A mapped fp32 shard would stay resident behind its fp32-kept weights; a bf16 one is the bf16 weights."""
    folder, _ = sharded_wan
    cast = load_diffusers_model(WanTransformer3DModel, folder, torch.bfloat16)
    gc.collect()
    assert not _mapped(folder)
    make_tiny_wan().to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    in_place = load_diffusers_model(WanTransformer3DModel, tmp_path / "bf16", torch.bfloat16)
    assert _mapped(tmp_path / "bf16")
    assert cast.blocks[0].attn1.to_q.weight.dtype == in_place.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_fp32_kept_modules_only_where_the_class_declares_them(tmp_path, make_tiny_wan):
    make_tiny_wan().to(torch.bfloat16).save_pretrained(tmp_path / "transformer")
    model = load_diffusers_model(WanTransformer3DModel, tmp_path / "transformer", torch.bfloat16)
    kept = {name for name, p in model.named_parameters() if p.dtype == torch.float32}
    assert kept and all(_kept_in_fp32(name) for name in kept)
    assert model.rope.freqs_cos.dtype == torch.float32
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16

    assert AutoencoderKLWan._keep_in_fp32_modules is None
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1).save_pretrained(tmp_path / "vae")
    vae = load_diffusers_model(AutoencoderKLWan, tmp_path / "vae", torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["mapped", "streamed"])
def test_weights_that_do_not_fit_are_named(sharded_wan, tmp_path, make_tiny_wan, dtype):
    folder, _ = sharded_wan
    shard = _shard_files(folder)[-1]
    state = load_file(str(shard))
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(shard), metadata={"format": "pt"})
    message = rf"do not match config.json: 1 missing \(e.g. \['{dropped}'\]\), 0 unexpected"
    with pytest.raises(ParamsError, match=message):
        load_diffusers_model(WanTransformer3DModel, folder, dtype)

    single = tmp_path / "single"
    make_tiny_wan().save_pretrained(single)
    weights = single / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(str(weights)), "extra.weight": torch.zeros(2)}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ParamsError, match=r"0 missing \(e.g. \[\]\), 1 unexpected \(e.g. \['extra.weight'\]\)"):
        load_diffusers_model(WanTransformer3DModel, single, dtype)
    weights.rename(single / "model.safetensors")
    with pytest.raises(ParamsError, match="neither diffusion_pytorch_model.safetensors nor .*index.json"):
        load_diffusers_model(WanTransformer3DModel, single, dtype)
    (single / "model.safetensors").unlink()
    with pytest.raises(ParamsError, match=r"has no \*.safetensors weights"):
        load_diffusers_model(WanTransformer3DModel, single, dtype)


@pytest.mark.parametrize("root", [REFERENCE_DIGITS, REFERENCE_DIGITS_MOE], ids=["base", "moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bundled_reference_model_loads_as_before(root, dtype):
    """Same weights, dtypes and prompt embeddings as the loader that built the model in fp32 and cast it."""
    loaded = load_model_dir(root, dtype=dtype)
    experts = {"transformer", "transformer_2"} if root == REFERENCE_DIGITS_MOE else {"transformer"}
    assert set(loaded.transformers) == experts
    for part, model in loaded.transformers.items():
        before = legacy_load(WanTransformer3DModel, root / part, dtype)
        for (name, new), (_, old) in zip(_tensors(model), _tensors(before), strict=True):
            assert new.dtype == old.dtype and torch.equal(new, old), name
    prompts = ["a handwritten 7", "three", ""]
    assert isinstance(loaded.text_encoder, DigitPromptEncoder)
    assert torch.equal(loaded.text_encoder.encode(prompts), DigitPromptEncoder.from_pretrained(root).encode(prompts))


def _tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


_FAMILIES = {
    "wan": (WanTransformer3DModel, lambda: tiny_wan(seed=5)),
    "hunyuan": (HunyuanVideoTransformer3DModel, tiny_hunyuan),
    "qwen": (QwenImageTransformer2DModel, tiny_qwen),
}


def _save_fp32(model: torch.nn.Module, folder: Path, layout: str) -> Path:
    model.to(torch.float32).save_pretrained(folder, max_shard_size="20KB" if layout == "sharded" else "10GB")
    files = len(list(folder.glob("*.safetensors")))
    assert files >= 2 if layout == "sharded" else files == 1
    return folder


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_cast_checkpoint_loads_what_from_pretrained_gives(tmp_path, family, layout, monkeypatch):
    """An fp32 checkpoint loaded into bf16 is streamed tensor by tensor, never through from_pretrained,
    and gives from_pretrained's model: same names, dtypes (fp32-kept modules too), values, config, eval mode."""
    cls, make = _FAMILIES[family]
    folder = _save_fp32(make(), tmp_path / "transformer", layout)
    with monkeypatch.context() as patch:
        patch.setattr(cls, "from_pretrained", classmethod(lambda *_, **__: pytest.fail("from_pretrained used")))
        model = load_diffusers_model(cls, folder, torch.bfloat16)
    assert not _mapped(folder)
    want = cls.from_pretrained(str(folder), torch_dtype=torch.bfloat16, local_files_only=True)
    got, expected = _tensors(model), _tensors(want)
    assert [name for name, _ in got] == [name for name, _ in expected]
    for (name, new), (_, old) in zip(got, expected, strict=True):
        assert new.dtype == old.dtype and new.device == old.device and torch.equal(new, old), name
        assert new.is_contiguous() == old.is_contiguous(), name
    assert {p.dtype for p in model.parameters()} >= {torch.bfloat16}
    assert dict(model.config) == dict(want.config)
    assert not model.training and type(model) is type(want)


def test_bf16_checkpoint_into_fp32_is_streamed_too(tmp_path):
    tiny_wan(seed=1).to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    model = load_diffusers_model(WanTransformer3DModel, tmp_path / "bf16", torch.float32)
    want = WanTransformer3DModel.from_pretrained(str(tmp_path / "bf16"), torch_dtype=torch.float32)
    for (name, new), (_, old) in zip(_tensors(model), _tensors(want), strict=True):
        assert new.dtype == old.dtype == torch.float32 and torch.equal(new, old), name


def test_streaming_reads_each_loaded_tensor_once_and_no_other(tmp_path, monkeypatch):
    single = tmp_path / "single"
    tiny_wan().save_pretrained(single)
    weights = single / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(str(weights)), "extra.weight": torch.zeros(2)}, str(weights), metadata={"format": "pt"})
    reads: list[str] = []
    read = loading._StreamedCheckpoint.__getitem__

    def recording_read(self, name):
        reads.append(name)
        return read(self, name)

    monkeypatch.setattr(loading._StreamedCheckpoint, "__getitem__", recording_read)
    with pytest.raises(ParamsError, match=r"0 missing \(e.g. \[\]\), 1 unexpected \(e.g. \['extra.weight'\]\)"):
        load_diffusers_model(WanTransformer3DModel, single, torch.bfloat16)
    assert sorted(reads) == sorted(tiny_wan().state_dict())


def test_a_truncated_cast_checkpoint_is_named(tmp_path):
    tiny_wan().save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ParamsError, match="not a readable safetensors file"):
        load_diffusers_model(WanTransformer3DModel, tmp_path, torch.bfloat16)
