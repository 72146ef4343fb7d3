"""Share of embed + head in one forward of the Wan2.1-T2V-1.3B transformer (random weights, CPU).

What a skipped step still costs is the embedding (patch embedding, rotary table, time and text
conditioning) and the head (norm, modulation, projection, unpatchify); the block stack is what a
cache saves. This measures both on diffusers' ``WanTransformer3DModel`` with the Wan2.1-T2V-1.3B
config (30 layers, dim 1536, 12 heads, ffn 8960, patch (1, 2, 2), text_dim 4096, 512 text tokens)
with random weights on a small latent, through ditcache's Wan adapter (embed -> blocks -> head).

To stay within a couple of minutes on one CPU thread the model is built with ``--built-layers``
blocks (default 2) of the real size: every block has the same shape and cost, so the stack time
is ``30 x`` the measured mean block time. The speedup efficiency a cache can reach at compute
fraction f is then ``(E + S) / (E + f S)`` / ``(1 / f)`` with E embed + head and S the stack.

    python -m bench.embed_head_share [--latent 16 5 30 52] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.wan_config import WAN21_T2V_1_3B

REPO = Path(__file__).resolve().parents[1]
TEXT_TOKENS = 512


def measure(latent: tuple[int, int, int, int], built_layers: int, reps: int) -> dict:
    from diffusers import WanTransformer3DModel

    from ditcache.families.wan.adapter import WanAdapter

    torch.manual_seed(0)
    config = dict(WAN21_T2V_1_3B, num_layers=built_layers)
    model = WanTransformer3DModel(**config).eval()
    adapter = WanAdapter(model)
    c, f, h, w = latent
    x = torch.randn(1, c, f, h, w)
    t = torch.tensor([500.0])
    text = torch.randn(1, TEXT_TOKENS, WAN21_T2V_1_3B["text_dim"])
    embed_s, block_s, head_s = [], [], []
    with torch.no_grad():
        for _ in range(reps + 1):  # the first repeat warms up
            t0 = time.perf_counter()
            state = adapter.embed(x, t, text)
            t1 = time.perf_counter()
            hidden = state.hidden_states
            for hidden in adapter.iter_blocks(state, hidden):
                pass
            t2 = time.perf_counter()
            adapter.head(hidden, state)
            t3 = time.perf_counter()
            embed_s.append(t1 - t0)
            block_s.append((t2 - t1) / built_layers)
            head_s.append(t3 - t2)
    embed, block, head = min(embed_s[1:]), min(block_s[1:]), min(head_s[1:])
    stack = block * WAN21_T2V_1_3B["num_layers"]
    fixed = embed + head
    share = fixed / (fixed + stack)
    efficiency = {}
    for speedup in (1.5, 2.0, 3.0, 4.0, 5.0):
        frac = 1 / speedup
        efficiency[f"{speedup:g}x"] = round((fixed + stack) / (fixed + frac * stack) / speedup, 4)
    tokens = (f // WAN21_T2V_1_3B["patch_size"][0]) * (h // WAN21_T2V_1_3B["patch_size"][1]) * (w // WAN21_T2V_1_3B["patch_size"][2])
    return {
        "what": "one forward of the Wan2.1-T2V-1.3B transformer config (random weights) on CPU through ditcache's "
        "Wan adapter; stack = 30 x the mean time of the built blocks; minimum over repeats",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in WAN21_T2V_1_3B.items()},
        "built_layers": built_layers,
        "latent_cfhw": list(latent),
        "image_tokens": tokens,
        "text_tokens": TEXT_TOKENS,
        "torch_threads": torch.get_num_threads(),
        "reps": reps,
        "embed_s": round(embed, 5),
        "head_s": round(head, 5),
        "block_s": round(block, 5),
        "stack_s": round(stack, 4),
        "embed_head_share_of_forward": round(share, 5),
        "embed_head_over_stack": round(fixed / stack, 5),
        "efficiency_ceiling_at_speedup": efficiency,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, nargs=4, default=[16, 5, 30, 52], metavar=("C", "F", "H", "W"))
    parser.add_argument("--built-layers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "embed_head_share.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = measure(tuple(args.latent), args.built_layers, args.reps)
    result["wall_time_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
