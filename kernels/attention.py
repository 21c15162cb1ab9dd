"""Masked attention over the engine's KV cache: the pure-torch reference.

Queries are the Q new tokens of each row (a prefill chunk, or a draft tree's nodes); keys are
the row's cache view. The boolean mask says which key slots each query may read (committed
prefix plus its own ancestors). The Triton tree-attention kernel must match this function.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def masked_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """``q`` [B, Hq, Q, D]; ``k``, ``v`` [B, Hkv, S, D]; ``mask`` [B, Q, S] bool -> [B, Hq, Q, D].

    Hq must be a multiple of Hkv (grouped-query attention). Every query must see at least one
    key (the engine always lets a node see itself), otherwise the softmax has no support.
    """
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask.unsqueeze(1), scale=scale,
                                          enable_gqa=hq != hkv)
