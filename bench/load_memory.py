"""Peak host memory and time of loading a Wan2.1-T2V-1.3B transformer: old loader, diffusers, new.

A random-weight checkpoint of the 1.3B transformer config is written as sharded safetensors
(``max_shard_size="1GB"``) in bf16 and in fp32, and the fp32 one also as a single 5.7 GB file
(``fp32-1file``, the way small models are often published). Each loader x checkpoint loads it into
bf16 in a fresh subprocess, so every peak RSS (``VmHWM``) is that load's alone; the subprocess also
reports its RSS just before loading (interpreter, torch and diffusers imported). The loaders:
``old`` builds an fp32 model and loads a whole state dict (the baseline); ``diffusers`` is
``from_pretrained(torch_dtype=bf16, low_cpu_mem_usage=True)``, reading whole shards rather than
mapping them when it casts (the loader before tensor-by-tensor streaming); ``new`` is
:func:`ditcache.runtime.loading.load_diffusers_model`.
Every loaded tensor is read once before the peak is taken, and ``seconds`` includes that read:
weights loaded from a bf16 checkpoint may still be mapped from the file, unread and so not yet
resident, and the first denoising step would page them in.

    python -m bench.load_memory [--workdir DIR] [--num-layers 30] [--loaders old diffusers new]
                               [--out bench/results/load_memory.json]

``ratio`` is peak RSS over the bytes of the loaded parameters and buffers; the new loader targets
at most 1.3. The checkpoints are reused when ``--workdir`` already holds them.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.wan_config import WAN21_T2V_1_3B
from ditcache.errors import ParamsError
from ditcache.runtime.loading import load_diffusers_model

REPO = Path(__file__).resolve().parent.parent

CHECKPOINT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp32-1file": torch.float32}
MAX_SHARD_SIZE = {"bf16": "1GB", "fp32": "1GB", "fp32-1file": None}  # None: one file
TARGET = "bf16"
METHODS = ("old", "diffusers", "new")


def legacy_load(cls: type, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The loader before ``from_pretrained``, kept only as the baseline being measured.

    It builds the model in fp32 with random init, reads every shard into one state dict, loads it
    and only then casts to ``dtype`` (keeping the class's fp32 modules in fp32).
    """
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ParamsError(f"{folder} has no *.safetensors weights (only safetensors checkpoints are loaded)")
    model = cls.from_config(cls.load_config(str(folder)))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    ignored = getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []
    state = {k: v for k, v in state.items() if not any(re.search(pattern, k) for pattern in ignored)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ParamsError(
            f"{folder}: the weights do not match config.json: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    keep_fp32 = set(getattr(cls, "_keep_in_fp32_modules", None) or [])
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keep_fp32.intersection(name.split(".")) else dtype)
    return model.eval()


def diffusers_load(cls: type, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' own loader as this repository called it before streaming: shards read whole (not
    mapped) when they are cast, since a mapped shard stays resident behind its fp32-kept weights."""
    from safetensors import safe_open

    with safe_open(str(sorted(folder.glob("*.safetensors"))[0]), framework="pt") as checkpoint:
        stored = checkpoint.get_slice(next(iter(checkpoint.keys()))).get_dtype()  # "F32" or "BF16"
    return cls.from_pretrained(
        str(folder),
        torch_dtype=dtype,
        low_cpu_mem_usage=True,
        local_files_only=True,
        use_safetensors=True,
        disable_mmap={"F32": torch.float32, "BF16": torch.bfloat16}.get(stored) != dtype,
    ).eval()


def proc_status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")


def write_checkpoints(workdir: Path, num_layers: int) -> dict[str, Path]:
    """Save the random-weight transformer once per checkpoint dtype (skipped when already there).

    The model is built on the meta device and materialised uninitialised, then filled with N(0, 0.02):
    diffusers' random init of 1.3B fp32 weights would take far longer and is not what is measured.
    """
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    folders = {name: workdir / f"wan1.3b-{name}" for name in CHECKPOINT_DTYPES}
    if all((folder / "config.json").is_file() for folder in folders.values()):
        return folders
    if all((folders[name] / "config.json").is_file() for name in ("bf16", "fp32")):  # written before 1file
        merge_shards(folders["fp32"], folders["fp32-1file"])
        return folders
    with init_empty_weights():
        model = WanTransformer3DModel(**{**WAN21_T2V_1_3B, "num_layers": num_layers})
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    # fp32 first, then cast in place: the fp32 model is never held twice.
    for name in ("fp32", "bf16"):
        model.to(CHECKPOINT_DTYPES[name])
        model.save_pretrained(folders[name], max_shard_size=MAX_SHARD_SIZE[name])
    del model
    merge_shards(folders["fp32"], folders["fp32-1file"])
    return folders


def merge_shards(sharded: Path, single: Path) -> None:
    """Write ``sharded``'s checkpoint as one ``diffusion_pytorch_model.safetensors`` in ``single``.

    The shards' bytes are copied as they are, behind one header whose offsets are shifted by the
    shards before: a second save_pretrained would hold the fp32 model and its serialized copy at once.
    """
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

    index = sharded / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():  # a small --num-layers fits one shard
        shards = [SAFETENSORS_WEIGHTS_NAME]
    else:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    header: dict[str, dict] = {}
    parts = []
    shift = 0
    for name in shards:
        with (sharded / name).open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            shard_header = json.loads(handle.read(length))
        metadata = shard_header.pop("__metadata__", None)
        if metadata:
            header["__metadata__"] = metadata
        for key, entry in shard_header.items():
            start, end = entry["data_offsets"]
            header[key] = {**entry, "data_offsets": [start + shift, end + shift]}
        size = (sharded / name).stat().st_size - 8 - length
        parts.append((sharded / name, 8 + length))
        shift += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data on 8 bytes
    single.mkdir(parents=True, exist_ok=True)
    with (single / SAFETENSORS_WEIGHTS_NAME).open("wb") as out:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        for path, data_start in parts:
            with path.open("rb") as handle:
                handle.seek(data_start)
                shutil.copyfileobj(handle, out, 64 << 20)
    shutil.copy(sharded / "config.json", single / "config.json")


def measure(method: str, folder: Path) -> dict[str, float | int]:
    """Load ``folder`` into the target dtype with one loader; runs inside the fresh subprocess."""
    from diffusers import WanTransformer3DModel

    dtype = CHECKPOINT_DTYPES[TARGET]
    before = proc_status_bytes("VmRSS")
    start = time.perf_counter()
    if method == "old":
        model = legacy_load(WanTransformer3DModel, folder, dtype)
    elif method == "diffusers":
        model = diffusers_load(WanTransformer3DModel, folder, dtype)
    else:
        model = load_diffusers_model(WanTransformer3DModel, folder, dtype)
    tensors = [*model.parameters(), *model.buffers()]
    with torch.no_grad():
        for tensor in tensors:
            tensor.sum()
    seconds = time.perf_counter() - start
    return {
        "peak_rss_bytes": proc_status_bytes("VmHWM"),
        "rss_before_load_bytes": before,
        "loaded_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "seconds": round(seconds, 2),
    }


def run_fresh(method: str, folder: Path) -> dict[str, float | int]:
    """Run :func:`measure` in a new interpreter and parse the JSON line it prints last."""
    command = [sys.executable, "-m", "bench.load_memory", "--measure", method, str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{method} load of {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_rows(folders: dict[str, Path], methods: list[str]) -> list[dict]:
    """One row per loader x checkpoint, each measured in a fresh subprocess (printed as it lands)."""
    rows = []
    for method in methods:
        for name, folder in folders.items():
            result = run_fresh(method, folder)
            ratio = round(result["peak_rss_bytes"] / result["loaded_bytes"], 3)
            rows.append({"loader": method, "checkpoint_dtype": name, "target_dtype": TARGET, **result, "ratio": ratio})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def weights_bytes(folder: Path) -> int:
    """Size of a checkpoint's safetensors files."""
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))


def table(rows: list[dict]) -> str:
    """Rows as an aligned text table (sizes in GB, 1e9 bytes)."""
    header = (
        f"{'loader':<9} {'ckpt':<10} {'target':<6} {'peak RSS GB':>11} {'RSS before GB':>13} "
        f"{'loaded GB':>9} {'ratio':>6} {'seconds':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['loader']:<9} {r['checkpoint_dtype']:<10} {r['target_dtype']:<6} "
            f"{r['peak_rss_bytes'] / 1e9:>11.2f} {r['rss_before_load_bytes'] / 1e9:>13.2f} "
            f"{r['loaded_bytes'] / 1e9:>9.2f} {r['ratio']:>6.2f} {r['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the checkpoints are written (default: a temp dir)")
    parser.add_argument("--num-layers", type=int, default=WAN21_T2V_1_3B["num_layers"], help="fewer for a quick run")
    parser.add_argument("--loaders", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load_memory.json")
    parser.add_argument("--measure", nargs=2, metavar=("LOADER", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folders = write_checkpoints(args.workdir or Path(tmp), args.num_layers)
        rows = bench_rows(folders, args.loaders)
        checkpoint_bytes = {name: weights_bytes(path) for name, path in folders.items()}
    print(table(rows))
    result = {
        "config": {**WAN21_T2V_1_3B, "num_layers": args.num_layers},
        "max_shard_size": MAX_SHARD_SIZE,
        "checkpoint_bytes": checkpoint_bytes,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
