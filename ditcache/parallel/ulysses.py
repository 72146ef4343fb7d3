"""Ulysses sequence parallelism: image tokens sharded over the SP group, attention over all of them.

Each SP rank holds a contiguous slice of the image tokens (the last rank's slice is padded with zero
tokens when the count does not divide the SP degree). Everything in a DiT block except attention is
per token, so it runs on the local slice unchanged. Attention is replaced by a processor that

1. projects q/k/v for the local tokens and applies the *local* rotary embedding (rope is per token,
   so rotating before the exchange is exact and needs no full-sequence rope);
2. all-to-all: ``[B, S/P, H, D] -> [B, S, H/P, D]`` (every rank: all tokens, its slice of the heads);
3. joint attention: text tokens are replicated on every rank, so each rank takes its head slice of
   the text q/k/v and concatenates it with the image q/k/v; padding keys are masked out;
4. all-to-all back ``[B, S, H/P, D] -> [B, S/P, H, D]`` for the image tokens, all-gather over heads
   for the text tokens (so every rank again holds the full text stream), output projections.

Cross-attention to text (Wan's ``attn2``) needs no communication: local queries against replicated
keys is already exact, so those modules keep their stock processor.

With a ring (``ulysses x ring``, :class:`~ditcache.parallel.groups.SequenceGroup`), step 2 runs
over the Ulysses factor only, which leaves each rank with its head slice of one contiguous chunk of
the sequence, and step 3 is ring attention over the ring factor (:mod:`ditcache.parallel.ring`).
A ring of 1 is exactly the path above. The heads need only divide the Ulysses factor.

The padding is the same for every tensor of one forward; a :class:`UlyssesContext` records it when
the hidden states are sharded and the processors read it from there. This module is the generic
part; each family's processors (what its attention projects and rotates) live in the family's
folder, ``ditcache/families/<name>/ulysses.py``, and its adapter hands them to :func:`apply_ulysses`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ditcache.errors import CacheConfigError
from ditcache.parallel.groups import Group, SequenceGroup
from ditcache.parallel.ring import check_ring_support, ring_attention


def shard_tokens(x: torch.Tensor, dim: int, group: Group) -> tuple[torch.Tensor, int]:
    """This rank's contiguous slice of ``x`` along ``dim``, and the number of zero tokens appended
    at the end of the full sequence so that it divides the group size."""
    if group.size == 1:
        return x, 0
    pad = -x.shape[dim] % group.size
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    return x.chunk(group.size, dim=dim)[group.rank], pad


def gather_tokens(local: torch.Tensor, dim: int, group: Group, pad: int) -> torch.Tensor:
    """Inverse of :func:`shard_tokens`: every rank gets the full sequence, padding removed."""
    if group.size == 1:
        return local
    full = torch.cat(group.all_gather(local, op="ulysses gather_tokens"), dim=dim)
    return full.narrow(dim, 0, full.shape[dim] - pad)


def _seq_to_heads(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-to-all ``[B, S/P, H, D] -> [B, S, H/P, D]`` (head slice ``r`` ends up on rank ``r``)."""
    b, s, h, d = x.shape
    p = group.size
    # [P(destination = head slice), B, S/P, H/P, D]
    chunks = x.reshape(b, s, p, h // p, d).permute(2, 0, 1, 3, 4)
    received = group.all_to_all(chunks, op="ulysses all_to_all (sequence -> heads)")
    # received[j] holds rank j's tokens for this rank's heads; rank order is sequence order
    return received.permute(1, 0, 2, 3, 4).reshape(b, p * s, h // p, d)


def _heads_to_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-to-all ``[B, S, H/P, D] -> [B, S/P, H, D]`` (inverse of :func:`_seq_to_heads`)."""
    b, s, hp, d = x.shape
    p = group.size
    # [P(destination = token slice), B, S/P, H/P, D]
    chunks = x.reshape(b, p, s // p, hp, d).permute(1, 0, 2, 3, 4)
    received = group.all_to_all(chunks, op="ulysses all_to_all (heads -> sequence)")
    # received[j] holds this rank's tokens for head slice j
    return received.permute(1, 2, 0, 3, 4).reshape(b, s // p, p * hp, d)


class UlyssesContext:
    """The SP group and the token layout of the forward in progress, shared by all processors.

    The pipeline calls :meth:`shard` on the block-stack input (this records the full length and the
    padding), :meth:`shard_like` on every other per-token tensor of the same sequence (rope,
    per-token modulation), and :meth:`gather` on the block-stack output.

    ``group`` is the whole SP group; a :class:`SequenceGroup` brings its ``ulysses x ring`` factors,
    any other group is all Ulysses.
    """

    def __init__(self, group: Group) -> None:
        self.group = group
        if isinstance(group, SequenceGroup):
            self.ulysses, self.ring = group.ulysses, group.ring
        else:
            self.ulysses, self.ring = group, Group("ring", (group.global_rank,), 0, None, group.timeout)
        if self.ring.size > 1:
            check_ring_support()
        self.seq_len: int | None = None
        self.pad = 0

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Shard the image tokens of a new forward and remember their layout."""
        local, self.pad = shard_tokens(x, dim, self.group)
        self.seq_len = x.shape[dim]
        return local

    def shard_like(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Shard another per-token tensor exactly like the last :meth:`shard` (padding included)."""
        self._require_layout()
        if x.shape[dim] != self.seq_len:
            raise ValueError(
                f"shard_like: dim {dim} of shape {tuple(x.shape)} has {x.shape[dim]} tokens, "
                f"but the sharded sequence has {self.seq_len}"
            )
        return shard_tokens(x, dim, self.group)[0]

    def group_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks that share this sequence: a cache statistic of the local
        shard becomes the statistic of the whole sequence, the same on every rank."""
        return self.group.all_reduce_sum(tensor, op="sp all_reduce (cache statistic)")

    def local_count(self, n: int) -> int:
        """How many of the first ``n`` tokens of the full sequence lie in this rank's shard.

        Shards are contiguous, so those tokens are always a prefix of the shard: ``local_count(seq_len)``
        is the number of real (non-padding) local tokens, and a leading block of the sequence (e.g.
        HunyuanVideo's first-frame tokens) is the first ``local_count(block)`` local tokens.
        """
        self._require_layout()
        local = (self.seq_len + self.pad) // self.group.size
        start = self.group.rank * local
        return max(0, min(local, min(n, self.seq_len) - start))

    def gather(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Full sequence of the last sharded layout on every rank, padding removed."""
        self._require_layout()
        return gather_tokens(local, dim, self.group, self.pad)

    def split_key_mask(self, mask: torch.Tensor, batch: int, n_txt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a bool key-padding mask over the unsharded ``[image, text]`` sequence (what the
        unsharded model passes, ``[B, N]`` or ``[B, 1, 1, N]``) into image ``[B, S]`` and text ``[B, T]``."""
        self._require_layout()
        n = self.seq_len + n_txt
        if mask.dtype != torch.bool or mask.numel() != batch * n or mask.shape[-1] != n:
            raise ValueError(
                f"Ulysses attention takes a bool key-padding mask ([B, N] or [B, 1, 1, N]) over the full "
                f"unsharded sequence, N = {self.seq_len} image + {n_txt} text tokens = {n}; got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        mask = mask.reshape(batch, n)
        return mask[:, : self.seq_len], mask[:, self.seq_len :]

    def _require_layout(self) -> None:
        if self.seq_len is None:
            raise RuntimeError(
                "Ulysses: no token layout recorded; call UlyssesContext.shard(hidden_states) on the "
                "block-stack input before running the blocks"
            )

    def attention(
        self,
        img_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        txt_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        *,
        img_key_mask: torch.Tensor | None = None,
        txt_key_mask: torch.Tensor | None = None,
        txt_first: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Joint attention of the sharded image tokens (``[B, S/P, H, D]``, rope applied) and the
        replicated text tokens (``[B, T, H, D]``); returns image ``[B, S/P, H, D]`` and text
        ``[B, T, H, D]`` outputs. Key masks are bool ``[B, S]`` / ``[B, T]``, True = attend, over the
        full unpadded image sequence and the text."""
        self._require_layout()
        b, s_local, heads, _ = img_qkv[0].shape
        if s_local * self.group.size != self.seq_len + self.pad:
            raise RuntimeError(
                f"Ulysses: attention got {s_local} local tokens, but the recorded layout is "
                f"{self.seq_len} tokens (+{self.pad} padding) over {self.group.size} ranks"
            )
        g = self.ulysses
        q, k, v = _seq_to_heads(torch.cat(img_qkv, dim=0), g).chunk(3, dim=0)
        hp = heads // g.size
        if txt_qkv is not None:
            txt_qkv = tuple(t[:, :, g.rank * hp : (g.rank + 1) * hp] for t in txt_qkv)
        if self.ring.size > 1:
            return self._ring_attention((q, k, v), txt_qkv, img_key_mask, txt_key_mask)
        n_txt = 0
        if txt_qkv is not None:
            tq, tk, tv = txt_qkv
            n_txt = tq.shape[1]
            q, k, v = (torch.cat([t, i] if txt_first else [i, t], dim=1) for t, i in ((tq, q), (tk, k), (tv, v)))
        mask = self._key_mask(b, n_txt, img_key_mask, txt_key_mask, txt_first, q.device)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        ).transpose(1, 2)
        if txt_qkv is None:
            return _heads_to_seq(out, g), None
        n_img = out.shape[1] - n_txt
        txt_out, img_out = (out[:, :n_txt], out[:, n_txt:]) if txt_first else (out[:, n_img:], out[:, :n_img])
        txt_full = torch.cat(g.all_gather(txt_out, op="ulysses all_gather (text heads)"), dim=2)
        return _heads_to_seq(img_out, g), txt_full

    def _ring_attention(
        self,
        img_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        txt_qkv: tuple[torch.Tensor, ...] | None,
        img_key_mask: torch.Tensor | None,
        txt_key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steps 3 and 4 with a ring: this rank holds its head slice of ring chunk ``ring.rank``."""
        def heads_first(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2)

        chunk_keys = self._ring_chunk_keys(img_qkv[0].shape[0], img_key_mask, img_qkv[0].device)
        img_out, txt_out = ring_attention(
            self.ring,
            tuple(map(heads_first, img_qkv)),
            chunk_keys,
            None if txt_qkv is None else tuple(map(heads_first, txt_qkv)),
            txt_key_mask,
        )
        img_out = _heads_to_seq(heads_first(img_out), self.ulysses)
        if txt_out is None:
            return img_out, None
        parts = self.ulysses.all_gather(heads_first(txt_out), op="ulysses all_gather (text heads)")
        return img_out, torch.cat(parts, dim=2)

    def _ring_chunk_keys(
        self, batch: int, img_key_mask: torch.Tensor | None, device: torch.device
    ) -> list[torch.Tensor | None]:
        """Which keys of each ring position's chunk count: bool ``[B, chunk]``, None where all do."""
        ring = self.ring.size
        if self.pad == 0 and img_key_mask is None:
            return [None] * ring
        valid = img_key_mask
        if valid is None:
            valid = torch.ones(batch, self.seq_len, dtype=torch.bool, device=device)
        chunks = torch.cat([valid, valid.new_zeros(batch, self.pad)], dim=1).chunk(ring, dim=1)
        for r, chunk in enumerate(chunks):
            if not bool(chunk.any(dim=1).all()):
                raise CacheConfigError(
                    f"ring attention: ring chunk {r} of {ring} holds no valid image token ({self.seq_len} tokens "
                    f"padded to {self.seq_len + self.pad} over SP {self.group.size}); use a smaller --ring"
                )
        return [None if bool(chunk.all()) else chunk for chunk in chunks]

    def _key_mask(
        self,
        batch: int,
        n_txt: int,
        img_key_mask: torch.Tensor | None,
        txt_key_mask: torch.Tensor | None,
        txt_first: bool,
        device: torch.device,
    ) -> torch.Tensor | None:
        """Bool ``[B, 1, 1, keys]`` mask in the joint key order, or None when every key is valid."""
        if self.pad == 0 and img_key_mask is None and txt_key_mask is None:
            return None
        def ones(n: int) -> torch.Tensor:
            return torch.ones(batch, n, dtype=torch.bool, device=device)

        img = ones(self.seq_len) if img_key_mask is None else img_key_mask
        img = torch.cat([img, ~ones(self.pad)], dim=1)
        txt = ones(n_txt) if txt_key_mask is None else txt_key_mask
        keys = torch.cat([txt, img] if txt_first else [img, txt], dim=1)
        return keys[:, None, None, :]


class UlyssesProcessor:
    """Base of the Ulysses processors (one per family, in its folder): keeps the stock processor so
    it can be put back."""

    def __init__(self, ctx: UlyssesContext, original: Any) -> None:
        self.ctx = ctx
        self.original = original

    @staticmethod
    def applies_to(module: torch.nn.Module) -> bool:
        """Whether this module's attention mixes image tokens with each other (needs Ulysses)."""
        return True


def apply_ulysses(
    transformer: torch.nn.Module,
    sp: Group | UlyssesContext,
    processors: Mapping[type, type[UlyssesProcessor]],
) -> UlyssesContext:
    """Install Ulysses processors on every token-mixing attention module of a diffusers transformer
    and return the context that carries the token layout.

    ``processors`` maps a stock diffusers processor class to its Ulysses replacement; the family's
    adapter provides it (``FamilyAdapter.ulysses_processors``), because this layer knows no family.

    Pass an existing :class:`UlyssesContext` to share one layout between transformers that run on the
    same tokens (Wan2.2's two experts). With an SP group of size 1 nothing is installed and the
    context's shard/gather are identities. Raises :class:`CacheConfigError` when a module's head count
    does not divide the SP degree or the transformer has no supported attention module.
    """
    ctx = sp if isinstance(sp, UlyssesContext) else UlyssesContext(sp)
    if ctx.group.size == 1:
        return ctx
    targets = []
    for name, module in transformer.named_modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, UlyssesProcessor):
            raise CacheConfigError(f"Ulysses processors are already installed on {type(transformer).__name__}")
        cls = processors.get(type(processor))
        if cls is None or not cls.applies_to(module):
            continue
        if module.heads % ctx.ulysses.size != 0:
            degree = ctx.group.size
            fits = math.gcd(module.heads, degree)  # the largest Ulysses degree that divides both
            raise CacheConfigError(
                f"attention module {name!r} has {module.heads} heads, which the Ulysses degree {ctx.ulysses.size} "
                f"(SP degree {degree} = ulysses {ctx.ulysses.size} x ring {ctx.ring.size}) does not divide; "
                f"run the rest of the SP degree as ring attention: --ulysses {fits} --ring {degree // fits}"
            )
        targets.append((module, cls))
    if not targets:
        supported = ", ".join(c.__name__ for c in processors) or "none given"
        raise CacheConfigError(
            f"{type(transformer).__name__} has no attention module with a supported processor ({supported})"
        )
    for module, cls in targets:
        module.set_processor(cls(ctx, module.processor))
    return ctx


def remove_ulysses(transformer: torch.nn.Module) -> int:
    """Put the stock processors back; returns how many modules were restored."""
    restored = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, UlyssesProcessor):
            module.set_processor(processor.original)
            restored += 1
    return restored
