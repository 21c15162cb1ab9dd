"""`EagleStep`: the EAGLE head's decoder layer as drafting runs it, written out with few kernels.

A drafted token costs one head forward, and on a launch-bound GPU a forward costs about one
launch per op. `EagleHeadModel.forward` (what training runs) calls HF's modules one by one;
`EagleStep.forward` computes the same layer from the same weights and leaves out what is not the
head's own work:

- per-step constants (positions, rotary tables, attention masks) come in from the caller, who
  makes them once per drafting step for all its forwards (`rope`, `additive_mask`);
- ``input_layernorm(embed_tokens(t))`` depends on the token alone: it is one lookup in a table
  normalised once for the whole vocabulary (`refresh`);
- one matmul for q/k/v and one for gate/up, over fused copies of the weights (as `specdec.fused`
  does for the target's layers);
- rotary embeddings turn q and k in one go (they are adjacent in the fused projection), with
  ``rotate_half``'s sign folded into the sine table; Qwen3's q/k norms run as one norm too;
- the layer's output state feeds two RMSNorms, the final norm (logits) and the next forward's
  ``hidden_norm``: they share one set of statistics;
- attention is SDPA with grouped-query heads and an additive mask: no K/V repeat, no mask cast.

The norms are RMSNorm's own arithmetic (float32 statistics, cast back, then the weight), so the
states equal the module's; the fused matmuls and SDPA may round differently in the last bit.

State carried between forwards (``carry`` [B, Q, 2, H]): ``carry[:, :, 0]`` is a state ``h`` the
head reads (the fused target features at depth 0, the head's own output after that), and
``carry[:, :, 1]`` is ``hidden_norm(h)``, the half of the attention input that comes from it.

This module knows one head layer's arithmetic; not slots, trees, caches' layout or the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from specdec.fused import unfusable

from .heads import EagleHeadModel


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


class EagleStep:
    """Drafting forwards of one `EagleHeadModel`; `refresh` before use when its weights may have changed.

    Example::

        step = EagleStep(head)
        step.refresh()
        rope = step.rope(positions)                                   # [B, P] -> cos, sin [B, P, D]
        out = step.forward(tokens, step.carry(features), rope, additive_mask(allowed), cache)
        out = step.forward(out.logits.argmax(-1), out.carry, rope_next, mask_next, cache)
    """

    def __init__(self, head: EagleHeadModel):
        reason = unfusable(head.layers)
        if reason is not None:
            raise ValueError(f"EagleHead: the head's layer cannot be run fused: {reason}")
        layer = head.layers[0]
        attn = layer.self_attn
        self.head, self.layer, self.attn = head, layer, attn
        self.eps = layer.hidden_norm.variance_epsilon
        norms = [layer.input_layernorm, layer.post_attention_layernorm, head.norm]
        if any(n.variance_epsilon != self.eps for n in norms):
            raise ValueError("EagleHead: the head's norms must share one epsilon")
        self.heads_q, self.heads_kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self._key: tuple | None = None  # the weights' identity and versions the fused copies were made from

    def refresh(self) -> None:
        """(Re)build the fused weights and the normed embedding table if the head's weights were
        replaced, moved or written into since the last build (host-side: call it outside a capture)."""
        params = [*self.layer.parameters(), self.head.embed_tokens.weight, self.head.norm.weight]
        key = tuple((p.data_ptr(), None if p.is_inference() else p._version, p.dtype, p.device) for p in params)
        if key == self._key:
            return
        layer, attn, mlp = self.layer, self.attn, self.layer.mlp
        with torch.no_grad():
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            self.qkv = torch.cat([p.weight for p in projections]).detach()
            self.qkv_bias = (torch.cat([p.bias for p in projections]).detach()
                             if attn.q_proj.bias is not None else None)
            self.gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
            self.inter = mlp.gate_proj.weight.shape[0]
            embed = self.head.embed_tokens.weight
            self.embed_normed = layer.input_layernorm(embed.to(layer.hidden_norm.weight.dtype)).detach()
            self.norms = torch.stack([self.head.norm.weight, layer.hidden_norm.weight]).detach()  # [2, H]
            self.qk_norm = None
            if hasattr(attn, "q_norm"):  # Qwen3: per-head q and k norms, one [heads_q + heads_kv, D] weight
                self.qk_norm = torch.cat([attn.q_norm.weight.expand(self.heads_q, -1),
                                          attn.k_norm.weight.expand(self.heads_kv, -1)]).detach()
                self.qk_eps = attn.q_norm.variance_epsilon
            half = self.head_dim // 2
            sign = torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)])
            self.sign = sign.to(device=embed.device, dtype=self.norms.dtype)
        self._key = key

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` [B, P, D] of the head's rotary embedding at ``positions`` [B, P], the sine
        with ``rotate_half``'s sign folded in; slice them per forward."""
        like = self.norms[:, :1]  # the head's dtype and device
        cos, sin = self.head.rotary_emb(like, positions)
        return cos, sin * self.sign

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
        b, q = tokens.shape
        hq, hkv, d = self.heads_q, self.heads_kv, self.head_dim
        hidden = carry[:, :, 0]
        x = torch.cat([self.embed_normed[tokens], carry[:, :, 1]], dim=-1)                    # [B, Q, 2H]
        qkv = nn.functional.linear(x, self.qkv, self.qkv_bias)
        qk = qkv[..., :(hq + hkv) * d].view(b, q, hq + hkv, d)
        if self.qk_norm is not None:
            qk = self.qk_norm * rms(qk, self.qk_eps)
        qk = self._rotate(qk.transpose(1, 2), *rope)                                          # [B, Hq + Hkv, Q, D]
        value = qkv[..., (hq + hkv) * d:].view(b, q, hkv, d).transpose(1, 2)
        key, value = cache.update(qk[:, hq:], value, 0)
        if kv_only:
            return None
        out = nn.functional.scaled_dot_product_attention(qk[:, :hq], key, value, attn_mask=mask,
                                                         scale=self.attn.scaling, enable_gqa=hq != hkv)
        h = hidden + self.attn.o_proj(out.transpose(1, 2).reshape(b, q, hq * d))
        gu = nn.functional.linear(self.layer.post_attention_layernorm(h), self.gate_up)
        h = h + self.layer.mlp.down_proj(self.layer.mlp.act_fn(gu[..., :self.inter]) * gu[..., self.inter:])
        if last_only:
            h = h[:, -1:]
        normed = rms(h, self.eps)
        if not carry_out:
            return StepOutput(self.head.lm_head(self.norms[0] * normed), None)
        both = self.norms * normed.unsqueeze(2)                                               # [B, Q', 2, H]
        return StepOutput(self.head.lm_head(both[:, :, 0]), torch.stack([h, both[:, :, 1]], dim=2))

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x * cos + rotate_half(x) * sin`` with the sign already in ``sin``; x [B, heads, Q, D]."""
        half = x.shape[-1] // 2
        return x * cos.unsqueeze(1) + torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin.unsqueeze(1)
