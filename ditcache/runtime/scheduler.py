"""Flow-matching Euler sampler with sigma shift.

Convention (rectified flow): ``x_sigma = (1 - sigma) * x_0 + sigma * noise`` and the model predicts
the velocity ``v = noise - x_0``, so one Euler step is ``x += (sigma_next - sigma) * v``.

The grid is Wan's own: ``sigma_i = 1 - i / N`` for ``i = 0..N`` (ending at exactly 0), each shifted
by ``sigma' = shift * s / (1 + (shift - 1) * s)``, and timesteps are ``sigma * 1000``. This is written
out rather than taken from diffusers' FlowMatchEulerDiscreteScheduler because that one spaces its
grid between ``sigma_max`` and ``1 / num_train_timesteps`` and carries state (a step index) across
calls; a run here must be a pure function of (N, shift) so that every rank and every calibration
run sees the same sigmas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditcache.errors import ParamsError


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Apply the sigma shift; shift > 1 spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class FlowMatchSchedule:
    """The sigmas and timesteps of one run.

    ``sigmas`` has N + 1 entries (the last is 0); ``timesteps`` has N entries (``sigmas[:-1] * 1000``).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    shift: float

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def step(self, sample: torch.Tensor, velocity: torch.Tensor, index: int) -> torch.Tensor:
        """One Euler step from sigma[index] to sigma[index + 1], accumulated in fp32."""
        dt = float(self.sigmas[index + 1] - self.sigmas[index])
        return (sample.float() + dt * velocity.float()).to(sample.dtype)


def flow_match_schedule(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> FlowMatchSchedule:
    """Sigmas and timesteps for ``num_steps`` Euler steps at sigma shift ``shift``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ParamsError(f"num_inference_steps must be an integer >= 1, got {num_steps!r}")
    if not isinstance(shift, (int, float)) or not shift > 0:
        raise ParamsError(f"sigma_shift must be a number > 0, got {shift!r}")
    base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    sigmas = shift_sigmas(base, float(shift))
    timesteps = sigmas[:-1] * num_train_timesteps
    return FlowMatchSchedule(sigmas=sigmas.float(), timesteps=timesteps.float(), shift=float(shift))


def experts_by_boundary(
    timesteps: torch.Tensor, boundary_ratio: float, high: str = "transformer", low: str = "transformer_2"
) -> list[str]:
    """Which expert of a two-expert model (Wan2.2 A14B) runs each step: the high-noise one while
    ``timestep >= boundary_ratio * num_train_timesteps`` (1000), as diffusers' Wan pipeline switches."""
    boundary = boundary_ratio * 1000
    return [high if float(t) >= boundary else low for t in timesteps]
