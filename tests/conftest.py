"""Shared fixtures: tiny random transformers of every family, tiny real prompt encoders, tiny saved
model directories (CPU, fp32), and a torchrun helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    HunyuanVideoTransformer3DModel,
    QwenImageTransformer2DModel,
    WanTransformer3DModel,
)

from ditcache.parallel.testing import free_port

REPO = Path(__file__).resolve().parent.parent
TEXT_DIM = 8
HUNYUAN_TEXT_DIM, HUNYUAN_POOLED_DIM = 16, 8
QWEN_TEXT_DIM = 16


@pytest.fixture(autouse=True)
def _isolated_user_config(tmp_path_factory, monkeypatch):
    """Every test (and the processes it starts) gets an empty per-user config home, so nothing a
    test calibrates lands in the real ~/.config/ditcache/params, and no user file there changes a result."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
    monkeypatch.delenv("DITCACHE_PARAMS_DIR", raising=False)


def tiny_wan(seed: int = 0, **overrides) -> WanTransformer3DModel:
    """A 2-layer, 2-head x 8-dim Wan transformer with random weights."""
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return WanTransformer3DModel(**config).eval()


class TinyPromptEncoder(torch.nn.Module):
    """A real (random) prompt encoder: characters -> embeddings -> one linear layer, fixed length."""

    def __init__(self, text_dim: int = TEXT_DIM, length: int = 6, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.length = length
        self.table = torch.nn.Parameter(torch.randn(128, text_dim, generator=generator))
        self.mix = torch.nn.Linear(text_dim, text_dim)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            codes = [ord(c) % 128 for c in prompt[: self.length]]
            ids[row, : len(codes)] = torch.tensor(codes, dtype=torch.long)
        return self.mix(self.table[ids])


@pytest.fixture
def make_tiny_wan():
    """Factory of tiny random Wan transformers (``make_tiny_wan(seed, **config_overrides)``)."""
    return tiny_wan


@pytest.fixture
def prompt_encoder() -> TinyPromptEncoder:
    return TinyPromptEncoder()


def tiny_hunyuan(image_condition_type: str | None = None, guidance_embeds: bool = True):
    """1 dual + 1 single block, 2 heads x 8 dims, rope axes (2, 2, 4) summing to the head dim."""
    torch.manual_seed(0)
    in_channels = 9 if image_condition_type == "latent_concat" else 4
    return HunyuanVideoTransformer3DModel(
        in_channels=in_channels,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=HUNYUAN_TEXT_DIM,
        pooled_projection_dim=HUNYUAN_POOLED_DIM,
        rope_axes_dim=(2, 2, 4),
        guidance_embeds=guidance_embeds,
        image_condition_type=image_condition_type,
    ).eval()


def tiny_tokenizer():
    """A whitespace word-level tokenizer; template words it does not know become [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "a cat dog on the red mat".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def tiny_hunyuan_encoders():
    """A 3-layer Llama and a 1-layer CLIP text model (HunyuanVideo's prompt encoders) and their tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    llama = LlamaModel(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=HUNYUAN_TEXT_DIM, intermediate_size=32, num_hidden_layers=3,
                    num_attention_heads=2, num_key_value_heads=2)
    ).eval()
    clip = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=HUNYUAN_POOLED_DIM, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    ).eval()
    return llama, tokenizer, clip


def tiny_qwen(zero_cond_t: bool = False):
    """2 dual-stream blocks, 2 heads x 16 dims, rope axes (4, 6, 6); 4 latent channels, 2x2 packing."""
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=QWEN_TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
        zero_cond_t=zero_cond_t,
    ).eval()


def tiny_qwen_encoder():
    """A 2-layer Qwen2.5-VL (text path used) and its tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=QWEN_TEXT_DIM, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=QWEN_TEXT_DIM)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    return Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer


def tiny_qwen_vae():
    """A 4-channel AutoencoderKLQwenImage with a non-trivial latent mean and std."""
    torch.manual_seed(0)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.1] * 4, latents_std=[1.5] * 4
    ).eval()


def write_tiny_digit_model(root: Path) -> Path:
    """A pixel-space model directory (tiny random Wan, 2 heads, grey 6 x 10 images = 15 tokens, the
    digit prompt encoder) in the reference model's layout, loadable with ``--model wan --model-dir``."""
    from ditcache.runtime.reference import DigitPromptEncoder, build_digit_tokenizer

    tiny_wan(0, in_channels=1, out_channels=1, text_dim=16).save_pretrained(root / "transformer")
    torch.manual_seed(0)
    DigitPromptEncoder(build_digit_tokenizer(), text_dim=16).save_pretrained(root)
    index = {
        "_class_name": "WanPipeline",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "text_encoder": ["ditcache", "DigitPromptEncoder"],
        "tokenizer": ["tokenizers", "Tokenizer"],
        "vae": None,
        "ditcache": {
            "latent_space": "pixel", "height": 6, "width": 10, "num_frames": 1, "default_steps": 6,
            "default_shift": 3.0, "default_guidance_scale": 4.0,
        },
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def torchrun(script: str, nproc: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc script args`` on a free port, one thread per rank."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        str(REPO / "launch" / script), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=REPO)


def write_tiny_hunyuan_dir(root: Path) -> Path:
    """A HunyuanVideo T2V directory: tiny transformer, Llama + CLIP prompt encoders, scheduler shift 5, no VAE."""
    llama, tokenizer, clip = tiny_hunyuan_encoders()
    tiny_hunyuan().save_pretrained(root / "transformer")
    for part, module in (("text_encoder", llama), ("tokenizer", tokenizer),
                         ("text_encoder_2", clip), ("tokenizer_2", tokenizer)):
        module.save_pretrained(root / part)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 5.0}))
    index = {
        "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
        "text_encoder": ["transformers", "LlamaModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "vae": None,
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def write_tiny_qwen_dir(root: Path) -> Path:
    """A Qwen-Image directory: tiny transformer, VAE and Qwen2.5-VL encoder, a dynamic-shift scheduler."""
    encoder, tokenizer = tiny_qwen_encoder()
    for part, module in (("transformer", tiny_qwen()), ("vae", tiny_qwen_vae()), ("text_encoder", encoder),
                         ("tokenizer", tokenizer)):
        module.save_pretrained(root / part)
    (root / "scheduler").mkdir()
    scheduler = {
        "base_image_seq_len": 4, "max_image_seq_len": 64, "base_shift": 0.3, "max_shift": 0.9,
        "use_dynamic_shifting": True, "time_shift_type": "exponential",
    }
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    index = {
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root
