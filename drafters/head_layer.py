"""Draft heads' layers as drafting runs them, written out with few kernels: `EagleStep` (the EAGLE
head's decoder layer) and `AdapterStep` (Kangaroo's attention-only adapter).

A drafted token costs one head forward, and on a launch-bound GPU a forward costs about one
launch per op. The head models' own ``forward`` (what training runs) call HF's modules one by
one; these compute the same layers from the same weights and leave out what is not the head's
own work:

- per-step constants (positions, rotary tables, attention masks) come in from the caller, who
  makes them once per drafting step for all its forwards (`signed_rope`, `additive_mask`);
- ``input_layernorm(embed_tokens(t))`` depends on the token alone: it is one lookup in a table
  normalised once for the whole vocabulary (`EagleStep.refresh`);
- one matmul for q/k/v and one for gate/up, over fused copies of the weights (as `specdec.fused`
  does for the target's layers);
- rotary embeddings turn q and k in one go (they are adjacent in the fused projection), with
  ``rotate_half``'s sign folded into the sine table; Qwen3's q/k norms run as one norm too;
- the EAGLE layer's output state feeds two RMSNorms, the final norm (logits) and the next
  forward's ``hidden_norm``: they share one set of statistics;
- attention is SDPA over an additive mask made once per step (no mask cast per forward); a single
  query attends with its heads packed as rows over their K/V head, so nothing is repeated;
- a forward that only has to leave its K/V in the cache (catch-up, Kangaroo's ``observe``) stops there.

The norms are RMSNorm's own arithmetic (float32 statistics, cast back, then the weight), so the
states equal the modules'; the fused matmuls and SDPA may round differently in the last bit.
Fused copies are refilled by ``refresh`` (in place, so captured graphs see them) whenever the
weights were replaced or written into.

This module knows layer arithmetic; not slots, trees, the caches' layout or the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from specdec.fused import unfusable


@dataclass
class StepOutput:
    logits: Tensor         # [B, Q', Vd] draft logits (Q' = Q, or 1 with ``last_only``)
    carry: Tensor | None   # [B, Q', 2, H] what a next forward reads; None when not asked for


def rms(x: Tensor, eps: float) -> Tensor:
    """RMSNorm without its weight, as HF's Llama/Qwen/Mistral RMSNorm computes it: float32
    statistics, the result cast back to ``x``'s dtype (the weight multiplies after the cast)."""
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def additive_mask(allowed: Tensor) -> Tensor:
    """[B, Q, S] bool (True: may attend) -> [B, 1, Q, S] float, 0 where allowed and -inf elsewhere."""
    return torch.where(allowed, 0.0, float("-inf")).unsqueeze(1)


def version_key(params) -> tuple:
    """What identifies the values of ``params``: storage, in-place write count, dtype and device."""
    return tuple((p.data_ptr(), None if p.is_inference() else p._version, p.dtype, p.device) for p in params)


def refill(old: Tensor | None, new: Tensor | None) -> Tensor | None:
    """``new``'s values in ``old``'s storage when their layouts match, else ``new``: a fused copy
    keeps its address, so CUDA graphs captured over it read the refreshed weights."""
    if old is None or new is None or old.shape != new.shape or old.dtype != new.dtype or old.device != new.device:
        return new
    return old.copy_(new)


class AttentionStep:
    """One HF attention module (q/k/v/o ``nn.Linear``, optional q/k norms) over the head's own cache.

    Example: ``out = AttentionStep(layer.self_attn)(x, signed_rope(rotary, like, positions), mask, cache)``.
    """

    def __init__(self, attn: nn.Module):
        self.attn = attn
        self.heads_q, self.heads_kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.qkv: Tensor | None = None       # [(Hq + 2 Hkv) D, in] fused q/k/v weight (and bias)
        self.qkv_bias: Tensor | None = None
        self.qk_norm: Tensor | None = None   # [Hq + Hkv, D] Qwen3's q and k norm weights, per head
        self.sign: Tensor | None = None      # [D] rotate_half's sign: -1 for the first half, +1 after
        self._key: tuple | None = None

    def refresh(self) -> None:
        """(Re)build the fused q/k/v weight when the module's weights changed (host-side)."""
        attn = self.attn
        key = version_key(attn.parameters())
        if key == self._key:
            return
        with torch.no_grad():
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            self.qkv = refill(self.qkv, torch.cat([p.weight for p in projections]))
            self.qkv_bias = refill(self.qkv_bias, torch.cat([p.bias for p in projections])
                                   if attn.q_proj.bias is not None else None)
            qk_norm = None
            if hasattr(attn, "q_norm"):  # Qwen3: per-head q and k norms, one [heads_q + heads_kv, D] weight
                qk_norm = torch.cat([attn.q_norm.weight.expand(self.heads_q, -1),
                                     attn.k_norm.weight.expand(self.heads_kv, -1)])
                self.qk_eps = attn.q_norm.variance_epsilon
            self.qk_norm = refill(self.qk_norm, qk_norm)
            half = self.head_dim // 2
            self.sign = refill(self.sign, torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)]).to(self.qkv))
        self._key = key

    def __call__(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, cache, kv_only: bool = False):
        """``x`` [B, Q, in] (the normed input) -> [B, Q, H] the attention's output after ``o_proj``;
        ``rope`` (cos, signed sin) [B, Q, D]; ``mask`` [B, 1, Q, S] additive; ``cache`` takes the
        K/V at its ``write_slots`` and returns S slots. ``kv_only``: stop after the write (None)."""
        b, q = x.shape[:2]
        hq, hkv, d = self.heads_q, self.heads_kv, self.head_dim
        qkv = nn.functional.linear(x, self.qkv, self.qkv_bias)
        qk = qkv[..., :(hq + hkv) * d].view(b, q, hq + hkv, d)
        if self.qk_norm is not None:
            qk = self.qk_norm * rms(qk, self.qk_eps)
        qk = rotate(qk.transpose(1, 2), *rope)                                                # [B, Hq + Hkv, Q, D]
        value = qkv[..., (hq + hkv) * d:].view(b, q, hkv, d).transpose(1, 2)
        key, value = cache.update(qk[:, hq:], value, 0)
        if kv_only:
            return None
        query, rep, sdpa = qk[:, :hq], hq // hkv, nn.functional.scaled_dot_product_attention
        if rep > 1 and q == 1:  # one query: its heads become rows over their K/V head, nothing repeated
            out = sdpa(query.reshape(b, hkv, rep, d), key, value, attn_mask=mask, scale=self.attn.scaling)
            out = out.reshape(b, hq, 1, d)
        else:  # as HF's SDPA path: K/V repeated per query head (masked GQA would fall back to the math kernel on CUDA)
            if rep > 1:
                key, value = (t[:, :, None].expand(b, hkv, rep, *t.shape[2:]).reshape(b, hq, *t.shape[2:])
                              for t in (key, value))
            out = sdpa(query, key, value, attn_mask=mask, scale=self.attn.scaling)
        return self.attn.o_proj(out.transpose(1, 2).reshape(b, q, hq * d))


def signed_rope(rotary: nn.Module, like: Tensor, positions: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` [B, P, D] of HF's rotary module at ``positions`` [B, P] (``like``: its dtype and
    device), the sine times ``sign`` (`AttentionStep.sign`): ``rotate_half``'s sign folded in."""
    cos, sin = rotary(like, positions)
    return cos, sin * sign


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` with the sign already in ``sin``; x [B, heads, Q, D]."""
    half = x.shape[-1] // 2
    return x * cos.unsqueeze(1) + torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin.unsqueeze(1)


class EagleStep:
    """Drafting forwards of one `EagleHeadModel`; `refresh` before use when its weights may have changed.

    State carried between forwards (``carry`` [B, Q, 2, H]): ``carry[:, :, 0]`` is a state ``h`` the
    head reads (the fused target features at depth 0, the head's own output after that), and
    ``carry[:, :, 1]`` is ``hidden_norm(h)``, the half of the attention input that comes from it.

    Example::

        step = EagleStep(head)
        step.refresh()
        rope = step.rope(positions)                                   # [B, P] -> cos, sin [B, P, D]
        out = step.forward(tokens, step.carry(features), rope, additive_mask(allowed), cache)
        out = step.forward(out.logits.argmax(-1), out.carry, rope_next, mask_next, cache)
    """

    def __init__(self, head):
        reason = unfusable(head.layers)
        if reason is not None:
            raise ValueError(f"EagleHead: the head's layer cannot be run fused: {reason}")
        self.head, self.layer = head, head.layers[0]
        self.attention = AttentionStep(self.layer.self_attn)
        self.eps = self.layer.hidden_norm.variance_epsilon
        norms = [self.layer.input_layernorm, self.layer.post_attention_layernorm, head.norm]
        if any(n.variance_epsilon != self.eps for n in norms):
            raise ValueError("EagleHead: the head's norms must share one epsilon")
        self.gate_up: Tensor | None = None       # [2 I, H] fused gate/up weight
        self.embed_normed: Tensor | None = None  # [V, H] input_layernorm of every token's embedding
        self.norms: Tensor | None = None         # [2, H] the final norm's and hidden_norm's weights
        self._key: tuple | None = None  # the weights' identity and versions the fused copies were made from

    def refresh(self) -> None:
        """(Re)build the fused weights and the normed embedding table if the head's weights were
        replaced, moved or written into since the last build (host-side: call it outside a capture)."""
        self.attention.refresh()
        layer, mlp = self.layer, self.layer.mlp
        key = version_key([*layer.parameters(), self.head.embed_tokens.weight, self.head.norm.weight])
        if key == self._key:
            return
        with torch.no_grad():
            self.gate_up = refill(self.gate_up, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            self.inter = mlp.gate_proj.weight.shape[0]
            embed = self.head.embed_tokens.weight.to(layer.hidden_norm.weight.dtype)
            self.embed_normed = refill(self.embed_normed, layer.input_layernorm(embed))           # [V, H]
            self.norms = refill(self.norms, torch.stack([self.head.norm.weight, layer.hidden_norm.weight]))  # [2, H]
        self._key = key

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` [B, P, D] at ``positions`` [B, P], for `forward`; slice them per forward."""
        return signed_rope(self.head.rotary_emb, self.norms[:, :1], positions, self.attention.sign)

    def carry(self, hidden: Tensor) -> Tensor:
        """[B, Q, H] states the head reads (fused features) -> [B, Q, 2, H] ``(h, hidden_norm(h))``."""
        hidden = hidden.to(self.norms.dtype)
        return torch.stack([hidden, self.layer.hidden_norm(hidden)], dim=2)

    def forward(self, tokens: Tensor, carry: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, cache,
                last_only: bool = False, carry_out: bool = True, kv_only: bool = False) -> StepOutput | None:
        """One head forward over ``tokens`` [B, Q] reading ``carry`` [B, Q, 2, H].

        ``rope`` is ``(cos, sin)`` [B, Q, D] from `rope`; ``mask`` [B, 1, Q, S] additive
        (`additive_mask`); ``cache`` takes this forward's K/V (its ``write_slots`` and
        ``view_len`` set by the caller) and returns S slots. ``last_only``: logits and carry of
        the last query only. ``carry_out``: also return what a next forward reads. ``kv_only``:
        stop once the K/V are in the cache (catch-up), returning None."""
        x = torch.cat([self.embed_normed[tokens], carry[:, :, 1]], dim=-1)                    # [B, Q, 2H]
        attn = self.attention(x, rope, mask, cache, kv_only=kv_only)
        if kv_only:
            return None
        h = carry[:, :, 0] + attn
        gu = nn.functional.linear(self.layer.post_attention_layernorm(h), self.gate_up)
        h = h + self.layer.mlp.down_proj(self.layer.mlp.act_fn(gu[..., :self.inter]) * gu[..., self.inter:])
        if last_only:
            h = h[:, -1:]
        normed = rms(h, self.eps)
        if not carry_out:
            return StepOutput(self.head.lm_head(self.norms[0] * normed), None)
        both = self.norms * normed.unsqueeze(2)                                               # [B, Q', 2, H]
        return StepOutput(self.head.lm_head(both[:, :, 0]), torch.stack([h, both[:, :, 1]], dim=2))


class AdapterStep:
    """Drafting forwards of one `KangarooAdapterModel`: ``norm(x + attn(input_layernorm(x)))``.

    Example: ``normed = AdapterStep(adapter)(exits, adapter_step.rope(positions), mask, cache)``.
    """

    def __init__(self, adapter):
        block = adapter.layers[0]
        attn = block.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if type(getattr(attn, name)) is not nn.Linear:
                raise ValueError(f"KangarooAdapter: the adapter's {name} is {type(getattr(attn, name)).__name__}, "
                                 "not a plain torch.nn.Linear")
        self.adapter, self.block = adapter, block
        self.attention = AttentionStep(attn)

    def refresh(self) -> None:
        """(Re)build the fused q/k/v weight when the adapter's weights changed (host-side)."""
        self.attention.refresh()

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` [B, P, D] at ``positions`` [B, P], for `forward`; slice them per forward."""
        return signed_rope(self.adapter.rotary_emb, self.adapter.norm.weight[:1], positions, self.attention.sign)

    def forward(self, exits: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, cache,
                kv_only: bool = False) -> Tensor | None:
        """[B, Q, H] exit states -> [B, Q, H] normed states for the target's LM head (None with
        ``kv_only``: the adapter's K/V written, nothing else computed)."""
        exits = exits.to(self.adapter.norm.weight.dtype)
        attn = self.attention(self.block.input_layernorm(exits), rope, mask, cache, kv_only=kv_only)
        return None if kv_only else self.adapter.norm(exits + attn)
