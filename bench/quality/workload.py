"""The workload: one model with its sampler, batches of prompts, and the one pipeline call every run makes.

A batch is a list of class labels and one seed: the pipeline draws the whole batch's noise from
that seed (``torch.randn`` of the batch shape on the CPU), so a method's samples and the uncached
reference start from the same noise without the benchmark touching latents. Which expert runs
which step is what the pipeline reports (``GenerationOutput.expert_steps``), and so are the sigmas
(``GenerationOutput.sigmas`` of the same probe request: the run's diffusers scheduler at the run's
step count and shift), as the pipeline hands them to a cache config's ``build``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ditcache
from ditcache.runtime.reference import prompt_for_label

EVAL_SEED = 1_000_000  # the evaluation batch's noise
CALIB_SEED = 2_000_000  # the calibration (and screening) batch's noise: another seed, other noise
# The published curve the schedule rules also run with (resampled to the run's steps).
WAN_CURVES = {"reference-digits": "Wan2.1-T2V-1.3B"}


@dataclass
class Workload:
    """One model with its sampler: everything but the prompts and the noise."""

    name: str
    model_type: str  # the params name the calibration is stored under
    pipeline: Any  # the public ditcache pipeline of the model
    steps: int
    shift: float
    guidance: float
    expert_steps: dict[str, list[int]]  # expert -> the steps it runs (only experts that run)
    num_layers: int
    run_sigmas: list[float] | None = None  # each step's sigma as the pipeline reported it (probe request)

    @property
    def sigmas(self) -> list[float]:
        """The noise level of each step, as the pipeline hands it to a cache config's ``build``."""
        if self.run_sigmas is None:
            raise ValueError(f"workload {self.name} has no run_sigmas: build it with make_workload (a probe request)")
        return list(self.run_sigmas)

    def used_experts(self) -> list[str]:
        """The experts that run, in the order they start."""
        return sorted(self.expert_steps, key=lambda e: self.expert_steps[e][0])

    def first_step(self, expert: str) -> int:
        return self.expert_steps[expert][0]


@dataclass(frozen=True)
class Batch:
    """Class labels (sample i draws digit ``labels[i]``) and the seed of the batch's noise."""

    labels: tuple[int, ...]
    seed: int

    @property
    def prompts(self) -> list[str]:
        return [prompt_for_label(k) for k in self.labels]

    def head(self, n: int) -> Batch:
        """The first ``n`` samples: same prompts and seed; torch fills a CPU normal draw in order, so
        their noise is the first ``n`` samples' of the whole batch."""
        return Batch(self.labels[:n], self.seed)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Samples:
    """Samples run one request each (batch 1, as a user runs a request): sample i draws digit
    ``labels[i]`` from noise seed ``seeds[i]``."""

    labels: tuple[int, ...]
    seeds: tuple[int, ...]

    def head(self, n: int) -> Samples:
        return Samples(self.labels[:n], self.seeds[:n])

    def __len__(self) -> int:
        return len(self.labels)


def make_samples(samples: int, first_seed: int) -> Samples:
    """``samples`` single-sample requests, sample i of class i % 10 with noise seed ``first_seed + i``."""
    return Samples(tuple(i % 10 for i in range(samples)), tuple(first_seed + i for i in range(samples)))


def generate_each(pipeline: Any, work: Workload, samples: Samples, cache: Any = None) -> list[ditcache.GenerationOutput]:
    """One public pipeline call per sample (batch 1)."""
    return [
        pipeline(prompt_for_label(label), num_inference_steps=work.steps, guidance_scale=work.guidance,
                 sigma_shift=work.shift, seed=seed, cache=cache, progress=False)
        for label, seed in zip(samples.labels, samples.seeds)
    ]  # fmt: skip


def make_batch(samples: int, seed: int) -> Batch:
    """``samples`` prompts, sample i of class i % 10, noise from ``seed``."""
    return Batch(tuple(i % 10 for i in range(samples)), seed)


def generate(pipeline: Any, work: Workload, batch: Batch, cache: Any = None) -> ditcache.GenerationOutput:
    """The one call every run makes: the public pipeline on ``batch`` with ``cache=``."""
    return pipeline(
        batch.prompts,
        num_inference_steps=work.steps,
        guidance_scale=work.guidance,
        sigma_shift=work.shift,
        seed=batch.seed,
        cache=cache,
        progress=False,
    )


def make_workload(model_dir: Path, name: str, steps: int, shift: float, guidance: float) -> Workload:
    """Load ``model_dir`` and ask its pipeline (one short unguided request) which expert runs which step."""
    pipeline = ditcache.load_pipeline(model_dir)
    probe = pipeline(
        prompt_for_label(0), num_inference_steps=steps, sigma_shift=shift, guidance_scale=1.0, progress=False
    )
    expert_steps = {expert: list(s) for expert, s in probe.expert_steps.items() if s}
    num_layers = len(pipeline.adapters["transformer"].transformer.blocks)
    model_type = pipeline.settings.model_type or name
    run_sigmas = [float(s) for s in probe.sigmas[:steps]]
    return Workload(name, model_type, pipeline, steps, shift, guidance, expert_steps, num_layers, run_sigmas)
