"""Sampling with diffusers' own schedulers, one fresh scheduler per request.

The official pipelines sample Wan with ``UniPCMultistepScheduler`` (flow prediction, flow sigmas,
as the published Wan Diffusers folders configure it) and HunyuanVideo and Qwen-Image with
``FlowMatchEulerDiscreteScheduler``, each setting its timesteps its own way. ditcache runs the same
schedulers, built from the model folder's ``scheduler/scheduler_config.json`` (its ``_class_name``
picks the class, as ``from_pretrained`` would), so a run without cache gives the latents diffusers'
pipeline gives, and a params file calibrated here is calibrated on the grid the model really runs.
A hand-written Euler loop would only match diffusers' FlowMatchEuler pipelines, not Wan's UniPC.

A diffusers scheduler carries state (its step index, and UniPC the previous model outputs), so every
request builds its own (:func:`build_scheduler` from the config, the request's shift applied:
UniPC's ``flow_shift``, FlowMatchEuler's ``shift``): a run stays a pure function of (config, steps,
shift, resolution) on every rank and in every calibration run, and two requests never share state.

:class:`Schedule` is what the denoising loop and the caches see: ``sigmas`` (N + 1 entries, the
last 0), ``timesteps`` (N, the model's time input as the scheduler gives it), ``num_steps``,
``shift`` and ``step(sample, velocity, index)``, which delegates to the scheduler's
``step(...).prev_sample``. Conventions are diffusers' rectified flow: ``x_sigma = (1 - sigma) x_0 +
sigma * noise``, the model predicts ``v = noise - x_0``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ditcache.errors import ParamsError

# The family defaults when a model folder has no scheduler config.
# Wan: the published Wan2.1/2.2 Diffusers folders' scheduler (and the one diffusers' Wan docs use).
WAN_SCHEDULER: dict[str, Any] = {
    "_class_name": "UniPCMultistepScheduler",
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 5.0,
    "num_train_timesteps": 1000,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
}
# HunyuanVideo: the published HunyuanVideo Diffusers folder's scheduler.
HUNYUAN_VIDEO_SCHEDULER: dict[str, Any] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 7.0}
# Qwen-Image: the published Qwen-Image folder's scheduler (resolution-dependent "dynamic" shift).
QWEN_IMAGE_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}
FAMILY_SCHEDULERS = {"wan": WAN_SCHEDULER, "hunyuan_video": HUNYUAN_VIDEO_SCHEDULER, "qwen_image": QWEN_IMAGE_SCHEDULER}


def check_steps(num_steps: Any) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ParamsError(f"num_inference_steps must be an integer >= 1, got {num_steps!r}")
    return num_steps


def check_shift(shift: Any) -> float:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0 or not math.isfinite(shift):
        raise ParamsError(f"sigma_shift must be a number > 0, got {shift!r}")
    return float(shift)


def scheduler_class(config: Mapping[str, Any]) -> type:
    """The diffusers scheduler class the config's ``_class_name`` names."""
    import diffusers
    from diffusers import SchedulerMixin

    name = config.get("_class_name")
    if not isinstance(name, str):
        raise ParamsError(f"a scheduler config needs its _class_name (e.g. UniPCMultistepScheduler), got {name!r}")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ParamsError(f"scheduler _class_name {name!r} is not a diffusers scheduler")
    return cls


def shift_key(cls: type) -> str:
    """The config key a scheduler class takes the sigma shift under: ``flow_shift`` or ``shift``."""
    import inspect

    names = inspect.signature(cls.__init__).parameters
    for key in ("flow_shift", "shift"):
        if key in names:
            return key
    raise ParamsError(f"{cls.__name__} takes no sigma shift (neither flow_shift nor shift)")


def build_scheduler(config: Mapping[str, Any], shift: float | None = None, **overrides: Any) -> Any:
    """A fresh diffusers scheduler from ``config`` (``from_config``), with ``shift`` (if given) as its shift."""
    cls = scheduler_class(config)
    if shift is not None:
        overrides[shift_key(cls)] = check_shift(shift)
    return cls.from_config(dict(config), **overrides)


def config_shift(config: Mapping[str, Any]) -> float | None:
    """The shift a scheduler config sets (``flow_shift`` for UniPC, ``shift`` for FlowMatchEuler)."""
    key = shift_key(scheduler_class(config))
    value = config.get(key)
    return None if value is None else float(value)


class Schedule:
    """The sigmas and timesteps of one run, and its (stateful) diffusers scheduler.

    ``sigmas`` has N + 1 entries (the last is 0 for the flow schedulers used here), ``timesteps``
    N (what the transformer gets as time, in the scheduler's dtype). ``step`` must be called once
    per step, in order, as in diffusers' loop; a new request needs a new Schedule.
    """

    def __init__(self, scheduler: Any, shift: float) -> None:
        self.scheduler = scheduler
        scheduler.set_begin_index(0)
        self.timesteps = scheduler.timesteps.detach().cpu().clone()
        self.sigmas = scheduler.sigmas.detach().cpu().float().clone()
        self.shift = float(shift)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        if len(self.sigmas) != len(self.timesteps) + 1:
            raise ParamsError(
                f"{type(scheduler).__name__} gave {len(self.timesteps)} timesteps but {len(self.sigmas)} sigmas; "
                "expected one more sigma (the final one) than timesteps"
            )
        self._next = 0

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def scheduler_name(self) -> str:
        return type(self.scheduler).__name__

    def step(self, sample: torch.Tensor, velocity: torch.Tensor, index: int) -> torch.Tensor:
        """From step ``index``'s sample and guided prediction to the next sample (the scheduler's
        ``prev_sample``), in the sample's dtype."""
        if index != self._next:
            raise RuntimeError(
                f"the {self.scheduler_name} schedule is at step {self._next} but was asked for step {index}: "
                "steps are taken once each, in order, and a new request needs a new schedule"
            )
        prev = self.scheduler.step(velocity, self.timesteps[index], sample, return_dict=False)[0]
        self._next += 1
        return prev.to(sample.dtype)

    def __repr__(self) -> str:
        return f"Schedule({self.scheduler_name}, {self.num_steps} steps, shift {self.shift:g})"


def with_family_default(config: Mapping[str, Any] | None, default: Mapping[str, Any]) -> Mapping[str, Any]:
    """``config`` (the family default when None); one without ``_class_name`` is of the default's class."""
    if config is None:
        return default
    return config if "_class_name" in config else {"_class_name": default["_class_name"], **config}


def wan_schedule(num_steps: int, shift: float, config: Mapping[str, Any] | None = None) -> Schedule:
    """Wan (2.1 and 2.2) as diffusers' WanPipeline: ``set_timesteps(num_steps)`` on the folder's
    scheduler (default: UniPC, flow prediction, flow sigmas) with ``shift`` as its flow shift."""
    scheduler = build_scheduler(with_family_default(config, WAN_SCHEDULER), shift)
    scheduler.set_timesteps(check_steps(num_steps), device="cpu")
    return Schedule(scheduler, shift)


def hunyuan_video_schedule(num_steps: int, shift: float, config: Mapping[str, Any] | None = None) -> Schedule:
    """HunyuanVideo as diffusers' HunyuanVideoPipeline: FlowMatchEuler with
    ``sigmas = linspace(1, 0, N + 1)[:-1]`` (shifted by the scheduler)."""
    scheduler = build_scheduler(with_family_default(config, HUNYUAN_VIDEO_SCHEDULER), shift)
    steps = check_steps(num_steps)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device="cpu")
    return Schedule(scheduler, shift)


def calculate_shift(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """diffusers' Qwen-Image ``mu``: linear in the image token count, with its pipeline's fallbacks."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def qwen_image_schedule(
    num_steps: int, image_seq_len: int, shift: float | None = None, config: Mapping[str, Any] | None = None
) -> Schedule:
    """Qwen-Image as diffusers' QwenImagePipeline: FlowMatchEuler with ``sigmas = linspace(1, 1/N, N)``
    and, for a dynamically shifting scheduler, ``mu`` from the image token count. ``shift`` given
    replaces the dynamic shift by that static one (the same map as ``mu = log(shift)`` for the
    exponential time shift); the reported shift of a dynamic run is the equivalent static one."""
    config = with_family_default(config, QWEN_IMAGE_SCHEDULER)
    steps = check_steps(num_steps)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if shift is not None:
        scheduler = build_scheduler(config, shift, use_dynamic_shifting=False)
        scheduler.set_timesteps(sigmas=sigmas, device="cpu")
        return Schedule(scheduler, shift)
    scheduler = build_scheduler(config)
    if not scheduler.config.use_dynamic_shifting:
        scheduler.set_timesteps(sigmas=sigmas, device="cpu")
        return Schedule(scheduler, float(scheduler.config.shift))
    mu = calculate_shift(image_seq_len, config)
    scheduler.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)
    return Schedule(scheduler, math.exp(mu) if scheduler.config.time_shift_type == "exponential" else mu)


def experts_by_boundary(
    timesteps: torch.Tensor,
    boundary_ratio: float,
    high: str = "transformer",
    low: str = "transformer_2",
    num_train_timesteps: int = 1000,
) -> list[str]:
    """Which expert of a two-expert model (Wan2.2 A14B) runs each step: the high-noise one while
    ``timestep >= boundary_ratio * num_train_timesteps``, as diffusers' WanPipeline switches."""
    boundary = boundary_ratio * num_train_timesteps
    return [high if t >= boundary else low for t in timesteps]
