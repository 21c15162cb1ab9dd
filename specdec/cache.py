"""KVCache: the engine's preallocated key/value store, with per-row lengths.

Layout per layer: ``k`` and ``v`` are ``[B, H_kv, S, D]``. Row b's tokens live in slots
``0 .. lengths[b] - 1``; slots ``0 .. start[b] - 1`` hold left padding and are never attended.
Slots at and after ``lengths[b]`` are scratch: a verification step writes its tree nodes there,
``commit`` moves the accepted ones into place, and the rest are simply overwritten later.
Rolling back is therefore just lowering ``lengths``.

The cache is also the ``past_key_values`` object the HF attention modules receive: their
``update(k, v, layer_idx)`` call writes the new keys at ``write_slots`` and returns the whole
buffers (cut to ``view_len``), so HF code still applies rotary embeddings, q/k norms and so on.

It knows slots and lengths, not tokens, trees or models.
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.kernels import kv_commit


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # [B] committed slots
        # Row and head indices for ``update``'s index_put_ (made once: no kernels per layer).
        self._rows = torch.arange(batch, device=device).view(batch, 1, 1)
        self._heads = torch.arange(num_kv_heads, device=device).view(1, num_kv_heads, 1)
        self.start = torch.zeros(batch, dtype=torch.long, device=device)  # [B] first real slot
        self.max_len = max_len
        self.write_slots: Tensor | None = None  # [B, Q] set for each forward
        self.view_len = max_len

    @classmethod
    def for_model(cls, config, batch: int, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, batch, kv_heads, head_dim, max_len, dtype, device)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # ---------------------------------------------------------------- HF Cache protocol
    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write ``key``/``value`` ``[B, H, Q, D]`` at ``write_slots``; return ``[B, H, view_len, D]``."""
        b, h, q, d = key.shape
        # index_put_, not scatter_: under torch.compile Inductor writes index_put_ in place, while
        # a scatter_ into the buffer becomes a copy of the whole buffer, scattered, then copied back
        # (two full-size kernels per buffer per layer; tests/test_engine.py checks the bytes).
        where = (self._rows[:b], self._heads, self.write_slots.view(b, 1, q))
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        kb.index_put_(where, key.to(kb.dtype))
        vb.index_put_(where, value.to(vb.dtype))
        return kb[:, :, : self.view_len], vb[:, :, : self.view_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.view_len

    # ---------------------------------------------------------------- engine operations
    def visible(self, slots: Tensor, among: Tensor, view_len: int) -> Tensor:
        """Attention mask for queries written at ``slots`` ``[B, Q]``.

        Each query sees its row's committed slots ``start <= j < lengths`` plus the new slots
        that ``among`` ``[B, Q, Q]`` allows (ancestors-or-self for a tree, causal for a chunk).
        Returns ``[B, Q, view_len]`` bool.
        """
        b, q = slots.shape
        j = torch.arange(view_len, device=slots.device)
        real = j >= self.start[:, None]  # [B, S]: left padding is never read
        mask = (real & (j < self.lengths[:, None])).unsqueeze(1).expand(b, q, view_len).clone()
        mask.scatter_(2, slots.unsqueeze(1).expand(b, q, q), among)
        mask &= real.unsqueeze(1)
        # Every query sees its own slot, so padding queries still have a finite softmax.
        mask.scatter_(2, slots.unsqueeze(-1), True)
        return mask

    def commit(self, src: Tensor, count: Tensor) -> None:
        """Move K/V of slots ``src`` ``[B, A]`` to ``lengths .. lengths + A - 1``; entries at and
        beyond ``count`` ``[B]`` are left alone. ``lengths`` is not changed here."""
        b, a = src.shape
        if a == 0:
            return
        dst = self.lengths[:, None] + torch.arange(a, device=src.device)
        keep = torch.arange(a, device=src.device)[None, :] < count[:, None]
        src = torch.where(keep, src, dst)  # skipped entries copy a slot onto itself
        if src.is_cuda:
            kv_commit(self.k + self.v, src, self.lengths, count.clamp(max=a))
            return
        for buf in self.k + self.v:
            h, d = buf.shape[1], buf.shape[3]
            moved = buf.gather(2, src.view(b, 1, a, 1).expand(b, h, a, d))
            buf.scatter_(2, dst.view(b, 1, a, 1).expand(b, h, a, d), moved)
