"""Write generated frames: a PNG grid for images, an MP4 for video (imageio-ffmpeg's bundled binary).

Frames come as ``[B, C, F, H, W]`` floats in [0, 1] (what the pipelines return). Every file is
written beside its destination under a temporary name and renamed over it when complete, so a
killed or failed write never leaves a truncated image or video where a reader expects one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditcache.errors import ParamsError

IMAGE_SUFFIXES = (".png",)
VIDEO_SUFFIXES = (".mp4",)


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so writers pick the format) that replaces
    ``path`` when the block completes and is removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``[B, C, F, H, W]`` in [0, 1] -> ``[B, F, H, W, 3]`` uint8 (grey channels are repeated)."""
    if frames.ndim != 5:
        raise ParamsError(f"expected frames of shape [B, C, F, H, W], got {tuple(frames.shape)}")
    channels = frames.shape[1]
    if channels == 1:
        frames = frames.expand(-1, 3, -1, -1, -1)
    elif channels != 3:
        raise ParamsError(f"cannot save {channels}-channel frames as an image (1 or 3 channels)")
    pixels = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).cpu().numpy()


def tile(images: np.ndarray, columns: int, padding: int = 2, gutter: int = 128) -> np.ndarray:
    """``[N, H, W, 3]`` -> one ``[rows*(H+p)+p, cols*(W+p)+p, 3]`` grid.

    The gutter is grey so that tiles stay apart on dark samples (digits are white on black).
    """
    count, height, width, _ = images.shape
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), gutter, np.uint8)
    for i, image in enumerate(images):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def upscale_factor(height: int, width: int, min_side: int = 128) -> int:
    """Integer nearest-neighbour factor that makes a small sample (16x16 digits) visible."""
    return max(1, -(-min_side // max(1, min(height, width))))


def save_png_grid(frames: torch.Tensor, path: str | Path, columns: int | None = None, scale: int = 1) -> Path:
    """One PNG: each sample's frames side by side in a row (images: all samples in a near-square grid)."""
    pixels = to_uint8(frames)
    batch, num_frames = pixels.shape[:2]
    if scale > 1:
        pixels = pixels.repeat(scale, axis=2).repeat(scale, axis=3)
    if columns is None:
        columns = num_frames if num_frames > 1 else int(np.ceil(np.sqrt(batch)))
    grid = tile(pixels.reshape(-1, *pixels.shape[2:]), columns)
    path = Path(path)
    with atomic_target(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path


def save_mp4(frames: torch.Tensor, path: str | Path, fps: int = 16, scale: int = 1) -> Path:
    """One MP4: the samples tiled side by side, frame by frame."""
    import imageio.v2 as imageio

    pixels = to_uint8(frames)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=2).repeat(scale, axis=3)
    batch = pixels.shape[0]
    video = [tile(pixels[:, f], int(np.ceil(np.sqrt(batch)))) for f in range(pixels.shape[1])]
    # yuv420p needs even sides; pad rather than let ffmpeg rescale.
    height, width = video[0].shape[:2]
    video = [np.pad(v, ((0, height % 2), (0, width % 2), (0, 0))) for v in video]
    path = Path(path)
    with atomic_target(path) as tmp:
        with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1, pixelformat="yuv420p") as writer:
            for frame in video:
                writer.append_data(frame)
    return path


def save_frames(frames: torch.Tensor, path: str | Path, fps: int = 16) -> Path:
    """Save by suffix: ``.png`` grid or ``.mp4`` video; small samples are upscaled to be visible."""
    path = Path(path)
    scale = upscale_factor(frames.shape[-2], frames.shape[-1])
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return save_png_grid(frames, path, scale=scale)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return save_mp4(frames, path, fps=fps, scale=scale)
    raise ParamsError(f"output {path} must end in one of {IMAGE_SUFFIXES + VIDEO_SUFFIXES}")
