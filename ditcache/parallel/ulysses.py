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

The padding is the same for every tensor of one forward; a :class:`UlyssesContext` records it when
the hidden states are sharded and the processors read it from there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ditcache.errors import CacheConfigError
from ditcache.parallel.groups import Group


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
    """

    def __init__(self, group: Group) -> None:
        self.group = group
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
        g = self.group
        b, s_local, heads, _ = img_qkv[0].shape
        if s_local * g.size != self.seq_len + self.pad:
            raise RuntimeError(
                f"Ulysses: attention got {s_local} local tokens, but the recorded layout is "
                f"{self.seq_len} tokens (+{self.pad} padding) over {g.size} ranks"
            )
        q, k, v = _seq_to_heads(torch.cat(img_qkv, dim=0), g).chunk(3, dim=0)
        n_txt = 0
        if txt_qkv is not None:
            hp = heads // g.size
            tq, tk, tv = (t[:, :, g.rank * hp : (g.rank + 1) * hp] for t in txt_qkv)
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


class _UlyssesProcessor:
    """Base of the Ulysses processors: keeps the stock processor so it can be put back."""

    def __init__(self, ctx: UlyssesContext, original: Any) -> None:
        self.ctx = ctx
        self.original = original

    @staticmethod
    def applies_to(module: torch.nn.Module) -> bool:
        """Whether this module's attention mixes image tokens with each other (needs Ulysses)."""
        return True


class UlyssesWanAttnProcessor(_UlyssesProcessor):
    """Ulysses version of ``WanAttnProcessor`` for self-attention (``attn1``) of Wan blocks."""

    @staticmethod
    def applies_to(module: torch.nn.Module) -> bool:
        return not module.is_cross_attention

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("Ulysses Wan self-attention takes neither encoder_hidden_states nor attention_mask")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rope(query, *rotary_emb), _wan_rope(key, *rotary_emb)
        out, _ = self.ctx.attention((query, key, value))
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (as in diffusers' WanAttnProcessor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class UlyssesHunyuanVideoAttnProcessor(_UlyssesProcessor):
    """Ulysses version of ``HunyuanVideoAttnProcessor2_0``: dual-stream blocks (separate text
    projections ``add_*_proj``) and single-stream blocks (shared projections, ``pre_only``).

    ``attention_mask`` is what the unsharded model passes: a bool key mask over
    ``[all image tokens, text tokens]``.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from diffusers.models.embeddings import apply_rotary_emb

        n_local = hidden_states.shape[1]
        single_stream = attn.add_q_proj is None
        x = hidden_states
        if single_stream and encoder_hidden_states is not None:
            x = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        qkv = [proj(x).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
        if attn.norm_q is not None:
            qkv[0] = attn.norm_q(qkv[0])
        if attn.norm_k is not None:
            qkv[1] = attn.norm_k(qkv[1])
        img = [t[:, :n_local] for t in qkv]
        txt = None
        if encoder_hidden_states is not None:
            if single_stream:
                txt = [t[:, n_local:] for t in qkv]
            else:
                txt = [
                    proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                    for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
                ]
                if attn.norm_added_q is not None:
                    txt[0] = attn.norm_added_q(txt[0])
                if attn.norm_added_k is not None:
                    txt[1] = attn.norm_added_k(txt[1])
        if image_rotary_emb is not None:
            img[0] = apply_rotary_emb(img[0], image_rotary_emb, sequence_dim=1)
            img[1] = apply_rotary_emb(img[1], image_rotary_emb, sequence_dim=1)
        img_mask = txt_mask = None
        if attention_mask is not None:
            n_txt = 0 if txt is None else txt[0].shape[1]
            img_mask, txt_mask = self.ctx.split_key_mask(attention_mask, x.shape[0], n_txt)
        img_out, txt_out = self.ctx.attention(
            tuple(img), None if txt is None else tuple(txt), img_key_mask=img_mask, txt_key_mask=txt_mask
        )
        img_out = img_out.flatten(2, 3).to(img[0].dtype)
        if encoder_hidden_states is None:
            return img_out, None
        txt_out = txt_out.flatten(2, 3).to(img[0].dtype)
        if getattr(attn, "to_out", None) is not None:
            img_out = attn.to_out[1](attn.to_out[0](img_out))
        if getattr(attn, "to_add_out", None) is not None:
            txt_out = attn.to_add_out(txt_out)
        return img_out, txt_out


class UlyssesQwenDoubleStreamAttnProcessor(_UlyssesProcessor):
    """Ulysses version of ``QwenDoubleStreamAttnProcessor2_0`` (joint ``[text, image]`` attention).

    ``image_rotary_emb`` is ``(local image freqs, full text freqs)``: the image part sharded like the
    tokens (:meth:`UlyssesContext.shard_like`), the text part as the unsharded model computes it.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise ValueError("Ulysses Qwen-Image attention requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("Ulysses Qwen-Image attention takes encoder_hidden_states_mask, not attention_mask")
        head_dim = attn.inner_dim // attn.heads
        img = [p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v)]
        txt = [
            p(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        ]
        norms = ((img, attn.norm_q, attn.norm_k), (txt, attn.norm_added_q, attn.norm_added_k))
        for stream, norm_q, norm_k in norms:
            if norm_q is not None:
                stream[0] = norm_q(stream[0])
            if norm_k is not None:
                stream[1] = norm_k(stream[1])
        if image_rotary_emb is not None:
            for stream, freqs in zip((img, txt), image_rotary_emb):
                stream[0] = apply_rotary_emb_qwen(stream[0], freqs, use_real=False)
                stream[1] = apply_rotary_emb_qwen(stream[1], freqs, use_real=False)
        txt_mask = None if encoder_hidden_states_mask is None else encoder_hidden_states_mask.to(torch.bool)
        img_out, txt_out = self.ctx.attention(tuple(img), tuple(txt), txt_key_mask=txt_mask, txt_first=True)
        img_out = attn.to_out[0](img_out.flatten(2, 3).to(img[0].dtype).contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.flatten(2, 3).to(img[0].dtype).contiguous())
        return img_out, txt_out


def _ulysses_processors() -> dict[type, type[_UlyssesProcessor]]:
    """Stock diffusers processor class -> its Ulysses replacement (imported on first use: these
    modules take seconds to import and only a parallel run needs them)."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    return {
        WanAttnProcessor: UlyssesWanAttnProcessor,
        HunyuanVideoAttnProcessor2_0: UlyssesHunyuanVideoAttnProcessor,
        QwenDoubleStreamAttnProcessor2_0: UlyssesQwenDoubleStreamAttnProcessor,
    }


def apply_ulysses(transformer: torch.nn.Module, sp: Group | UlyssesContext) -> UlyssesContext:
    """Install Ulysses processors on every token-mixing attention module of a diffusers transformer
    (Wan, HunyuanVideo, Qwen-Image) and return the context that carries the token layout.

    Pass an existing :class:`UlyssesContext` to share one layout between transformers that run on the
    same tokens (Wan2.2's two experts). With an SP group of size 1 nothing is installed and the
    context's shard/gather are identities. Raises :class:`CacheConfigError` when a module's head count
    does not divide the SP degree or the transformer has no supported attention module.
    """
    ctx = sp if isinstance(sp, UlyssesContext) else UlyssesContext(sp)
    if ctx.group.size == 1:
        return ctx
    replacements = _ulysses_processors()
    targets = []
    for name, module in transformer.named_modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, _UlyssesProcessor):
            raise CacheConfigError(f"Ulysses processors are already installed on {type(transformer).__name__}")
        cls = replacements.get(type(processor))
        if cls is None or not cls.applies_to(module):
            continue
        if module.heads % ctx.group.size != 0:
            raise CacheConfigError(
                f"attention module {name!r} has {module.heads} heads, which the SP degree "
                f"{ctx.group.size} does not divide; Ulysses needs heads % sp_degree == 0"
            )
        targets.append((module, cls))
    if not targets:
        supported = ", ".join(c.__name__ for c in replacements)
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
        if isinstance(processor, _UlyssesProcessor):
            module.set_processor(processor.original)
            restored += 1
    return restored
