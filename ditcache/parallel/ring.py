"""Ring attention over the ring factor of the SP group, on torch's own ring loop.

With ``ulysses x ring`` sequence parallelism (:mod:`ditcache.parallel.config`), the Ulysses
all-to-all leaves every rank with its head slice of one contiguous chunk of the image sequence: ring
position ``r`` holds chunk ``r``. Attention over the whole sequence is then ring attention: every
rank attends to its own key/value chunk, passes it on to the next ring rank, attends to the one it
received, and so on, merging the partial results by their log-sum-exp. The loop is torch's
(``_templated_ring_attention`` of ``torch.distributed.tensor.experimental``, the one behind its
``context_parallel``), called directly on the local chunks rather than through ``context_parallel``:

- ``context_parallel`` patches ``F.scaled_dot_product_attention`` process-wide and wraps the
  arguments in DTensors, while an attention processor already holds its local shards and must
  leave the stock SDPA of every other module alone;
- its dispatch knows only the CUDA SDPA kernels, and neither it nor the ring loop takes a mask;
  the loop does take the attention op as an argument, so the op here is the device's SDPA kernel
  that returns the log-sum-exp, and it drops the keys a chunk must not contribute (the SP padding
  at the end of the sequence, a model's key mask) itself: torch's loop hands over chunk
  ``(rank - i) % size`` at step ``i``, so the op knows whose chunk it holds;
- the joint text tokens (HunyuanVideo, Qwen-Image) are replicated on every rank, so they are not
  part of the ring: image queries attend to them once, locally, and text queries attend to each
  ring position's image chunk where it lies; the partial results are merged with torch's merger.

Text outputs are merged in ring order on every rank, so all ranks hold the same text stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ditcache.errors import CacheConfigError
from ditcache.parallel.groups import Group

try:
    from torch.distributed.tensor.experimental._context_parallel._attention import (
        _cp_options,
        _RotateMethod,
        _SDPAMerger,
        _templated_ring_attention,
    )
except ImportError:  # an older torch: Ulysses still runs, a ring is refused at setup
    _templated_ring_attention = None

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_SEQ_DIM = 2  # [B, H, S, D], the layout of torch's SDPA kernels and of its ring loop


def check_ring_support() -> None:
    """Raise :class:`CacheConfigError` when this torch lacks the ring loop used here."""
    if _templated_ring_attention is None:
        raise CacheConfigError(
            f"--ring > 1 needs torch's ring attention (torch.distributed.tensor.experimental._context_parallel), "
            f"which torch {torch.__version__} lacks; upgrade torch or use --ring 1"
        )


def ring_attention(
    ring: Group,
    img_qkv: QKV,
    chunk_keys: Sequence[torch.Tensor | None],
    txt_qkv: QKV | None = None,
    txt_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of this rank's image chunk (q/k/v ``[B, H, C, D]``) over the image chunks of every
    ring rank and the replicated text tokens (``[B, H, T, D]``, or None).

    ``chunk_keys[r]`` says which keys of ring position ``r``'s chunk count (bool ``[B, C]``, None:
    all); ``txt_keys`` likewise for the text (``[B, T]``). Returns the image output ``[B, H, C, D]``
    and the text output ``[B, H, T, D]`` (None without text).
    """
    q, k, v = img_qkv
    sources = iter([(ring.rank - i) % ring.size for i in range(ring.size)])

    def step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False):
        # is_causal is torch's per-step mask mode: always False, DiT attention is not causal
        return _attend(query, key, value, chunk_keys[next(sources)])

    with ring.failures("ring attention"), _ring_options():
        out, lse = _templated_ring_attention(ring.pg, _SEQ_DIM, step, q, k, v)[:2]
    if txt_qkv is None:
        return out, None
    tq, tk, tv = txt_qkv
    img_out = _merge([(out, lse), _attend(q, tk, tv, txt_keys)])
    local_out, local_lse = _attend(tq, k, v, chunk_keys[ring.rank])
    packed = torch.cat([local_out.float(), local_lse.unsqueeze(-1).float()], dim=-1)  # one exchange
    parts = [(p[..., :-1], p[..., -1]) for p in ring.all_gather(packed, op="ring all_gather (text queries)")]
    return img_out, _merge([*parts, _attend(tq, tk, tv, txt_keys)])


@contextmanager
def _ring_options() -> Iterator[None]:
    """torch keeps the ring's settings in a module global: set them for one call, then restore them."""
    saved = _cp_options.enable_load_balance, _cp_options.rotate_method
    _cp_options.enable_load_balance = False  # torch balances causal masks only
    _cp_options.rotate_method = _RotateMethod.ALL_TO_ALL  # a true ring: one chunk in flight, not all gathered
    try:
        yield
    finally:
        _cp_options.enable_load_balance, _cp_options.rotate_method = saved


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and log-sum-exp of ``q`` over the keys that ``keys`` (bool ``[B, S]``, None: all) keeps.

    Masked keys are dropped rather than masked: torch's CPU kernel takes no bool mask, and keys that
    all samples drop (the SP padding) cost nothing. Samples that keep different keys run one by one.
    """
    if keys is None:
        return _sdpa_lse(q, k, v)
    if not bool(keys.any(dim=1).all()):
        raise ValueError("ring attention: a sample has no valid key in a chunk it must attend to")
    if bool((keys == keys[:1]).all()):
        kept = keys[0].nonzero().squeeze(1)
        return _sdpa_lse(q, k.index_select(_SEQ_DIM, kept), v.index_select(_SEQ_DIM, kept))
    outs, lses = zip(*(_attend(q[b : b + 1], k[b : b + 1], v[b : b + 1], keys[b : b + 1]) for b in range(len(keys))))
    return torch.cat(outs), torch.cat(lses)


def _sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA (default scale, no mask) and the log-sum-exp ``[B, H, S]`` of each query's scores."""
    aten = torch.ops.aten
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse
    if q.device.type == "cuda":  # memory-efficient kernel: every dtype; its lse is padded to 32 queries
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out, lse[..., : q.shape[_SEQ_DIM]]
    raise CacheConfigError(f"ring attention runs on CPU or CUDA tensors, not {q.device.type}")


def _merge(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention output over the union of the key sets of ``parts`` ((output, lse) pairs), merged in
    order by torch's merger (fp32), in the dtype of the last part."""
    merger = _SDPAMerger(convert_to_f32=True, seq_dim=_SEQ_DIM)
    for out, lse in parts:
        merger.step(out, lse, False)
    return merger.results()[0]
