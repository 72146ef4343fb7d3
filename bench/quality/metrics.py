"""What a run is measured by: real block executions per branch, and image quality against the reference.

Block executions of a run through a ditcache cache come from the pipeline's own telemetry
(:func:`telemetry_block_calls`: stack passes per branch, which the adapters count whatever the cache
claims). A diffusers hook replaces block forwards inside the stack, which the adapter cannot see, so
those runs are counted by :class:`BlockCounter`. PSNR carries a bootstrap confidence interval over
the samples, so a margin between two methods can be read against the spread of the batch.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

import ditcache

PSNR_CAP_DB = 100.0  # identical images (the uncached row) report this instead of +inf (strict JSON)
BOOTSTRAP_RESAMPLES = 1000


class BlockCounter:
    """Counts real block executions per CFG branch, with forward hooks on each block's feed-forward network.

    A hook on the block module itself would also fire when a diffusers cache hook replaces the
    block's forward and returns a cached value; the FFN inside runs only when the block really does.
    The branch and step are the ones the pipeline's adapter call names (its ``is_cond`` and ``step``
    keywords); ``per_step`` keeps the count of each (branch, step), which shows a hook's plan.
    """

    def __init__(self, pipeline: Any) -> None:
        self.start()
        self.where: tuple[str, int] = ("cond", 0)
        for adapter in pipeline.adapters.values():
            adapter.register_forward_pre_hook(self.enter, with_kwargs=True)
            for block in adapter.transformer.blocks:
                block.ffn.register_forward_hook(self.count)

    def start(self) -> None:
        """Start counting a new run."""
        self.counts = {"cond": 0, "uncond": 0}
        self.per_step: Counter[tuple[str, int]] = Counter()

    def enter(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.where = ("cond" if kwargs.get("is_cond", True) else "uncond", kwargs.get("step", 0))

    def count(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.counts[self.where[0]] += 1
        self.per_step[self.where] += 1


def block_flop_shares(pipeline: Any, prompt: str, steps: int = 2) -> dict[str, float]:
    """Each part's share of one Wan block's FLOPs at this workload's size (matmuls; elementwise ops
    are left out): self-attention ``8 L d^2 + 4 L^2 d``, cross-attention ``4 L d^2 + 4 T d^2 + 4 L T d``,
    feed-forward ``4 L d f``, with L image tokens and T text tokens read off one probe request."""
    adapter = next(iter(pipeline.adapters.values()))
    block = adapter.transformer.blocks[0]
    seen: dict[str, int] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        seen.update(L=hidden.shape[1], d=hidden.shape[2], T=text.shape[1])

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipeline(prompt, num_inference_steps=steps, guidance_scale=1.0, progress=False)
    finally:
        handle.remove()
    L, d, T = seen["L"], seen["d"], seen["T"]
    f = block.ffn.net[-1].in_features if hasattr(block.ffn, "net") else 4 * d
    flops = {"attn1": 8 * L * d * d + 4 * L * L * d, "attn2": 4 * L * d * d + 4 * T * d * d + 4 * L * T * d,
             "ffn": 4 * L * d * f}  # fmt: skip
    total = sum(flops.values())
    return {k: v / total for k, v in flops.items()} | {"tokens": L, "text_tokens": T, "dim": d, "ffn_dim": f}


class ComputeCounter:
    """Block compute that really ran, per CFG branch, in units of one block: forward hooks on each
    block's self-attention (``attn1.to_q``), cross-attention (``attn2.to_q``) and feed-forward network,
    each weighted by its FLOP share (:func:`block_flop_shares`). A hook replacing a whole block or an
    attention module keeps the inner modules from running, so only real work is counted; a method
    that skips whole blocks is counted in whole blocks."""

    def __init__(self, pipeline: Any, shares: dict[str, float]) -> None:
        self.start()
        self.branch = "cond"
        for adapter in pipeline.adapters.values():
            adapter.register_forward_pre_hook(self.enter, with_kwargs=True)
            for block in adapter.transformer.blocks:
                for part, module in (("attn1", block.attn1.to_q), ("attn2", block.attn2.to_q), ("ffn", block.ffn)):
                    module.register_forward_hook(self.adder(shares[part]))

    def start(self) -> None:
        self.counts = {"cond": 0.0, "uncond": 0.0}

    def enter(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.branch = "cond" if kwargs.get("is_cond", True) else "uncond"

    def adder(self, weight: float) -> Any:
        def add(module: torch.nn.Module, args: tuple, output: Any) -> None:
            self.counts[self.branch] += weight

        return add


def telemetry_block_calls(output: ditcache.GenerationOutput, num_layers: int, probe_blocks: int) -> dict[str, int]:
    """Block executions per branch from the request's telemetry: every stack pass runs ``num_layers``
    blocks, every skipped step ``probe_blocks`` (the first-block rule's probe; 0 for the others)."""
    passes = output.total_stack_passes()
    return {
        name: passes[name] * num_layers + (steps - passes[name]) * probe_blocks
        for name, steps in output.branch_steps.items()
    }


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    capped = torch.full_like(mse, PSNR_CAP_DB)
    return torch.where(mse > 0, 10 * torch.log10(1.0 / mse.clamp_min(1e-30)), capped).clamp(max=PSNR_CAP_DB)


def bootstrap_psnr_ci(per_image_mse: torch.Tensor, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of the pooled PSNR, resampling images (fixed seed: reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    n = per_image_mse.numel()
    picks = torch.randint(n, (BOOTSTRAP_RESAMPLES, n), generator=generator)
    pooled = psnr_from_mse(per_image_mse[picks].mean(1))
    low, high = torch.quantile(pooled, torch.tensor([0.025, 0.975], dtype=pooled.dtype))
    return [round(float(low), 4), round(float(high), 4)]


def quality_metrics(images: torch.Tensor, reference: torch.Tensor, classifier: Any, labels: torch.Tensor) -> dict:
    """PSNR pooled (with its 95% interval) / mean per image, SSIM, accuracy; images [B, 1, H, W] in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    per_image_mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    per_image = psnr_from_mse(per_image_mse)
    identical = bool(torch.equal(images, reference))
    ssim = 1.0 if identical else float(structural_similarity_index_measure(images, reference, data_range=1.0))
    predicted = classifier.predict(images * 2 - 1)
    return {
        "psnr": round(float(psnr_from_mse(per_image_mse.mean())), 4),
        "psnr_ci95": bootstrap_psnr_ci(per_image_mse),
        "psnr_mean_per_image": round(float(per_image.mean()), 4),
        "psnr_min_image": round(float(per_image.min()), 4),
        "ssim": round(ssim, 6),
        "accuracy": round(float((predicted == labels).float().mean()), 4),
        "max_abs_err": round(float((images - reference).abs().max()), 6),
        "per_image_mse": [float(f"{v:.6g}") for v in per_image_mse.tolist()],
    }


def to_images(frames: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B*F, C, H, W]."""
    b, c, f, h, w = frames.shape
    return frames.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def train_classifier(seed: int = 0, epochs: int = 4) -> Any:
    """The digit classifier that scores accuracy (trained on the model's own MNIST digits)."""
    from ditcache.runtime.reference import load_digits, train_digit_classifier

    images, labels = load_digits(16)
    return train_digit_classifier(images, labels, epochs=epochs, seed=seed)
