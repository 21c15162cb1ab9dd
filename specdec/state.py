"""DecodeState: everything one decoding call reads and writes on the device, in one place.

Layout: every prompt is left padded to a common width, plus extra pad columns so each row has
at least ``spec.lookback`` committed slots. Row b's committed tokens are
``tokens[b, start[b]:seq_len[b]]``; its *root*, the last committed token, is not in the KV cache
yet: each step feeds the root together with the draft nodes, so the root's logits judge the first
draft level and a step with no draft is plain autoregressive decoding.

Sampling draws from torch's global generator, as HF ``generate`` does (``torch.manual_seed``
makes a call repeatable); under CUDA-graph replay every replay draws fresh numbers.

It knows buffers and their meaning; not models, drafters or the host loop.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from specdec.verifiers.acceptance import SamplingParams


@dataclass
class DecodeState:
    """Read by drafters at the start of a step; written by the step's commit.

    Example: the root token of every row is
    ``state.tokens.gather(1, (state.seq_len - 1).unsqueeze(1))``.
    """

    target: "object"  # specdec.runner.ModelRunner of the target model
    tokens: Tensor  # [B, L] long, committed tokens, left padded
    seq_len: Tensor  # [B] long, committed tokens per row, padding included
    start: Tensor  # [B] long, index of each row's first real token
    params: SamplingParams
    # Static upper bound on every row's seq_len during the current steps: drafters read
    # tokens[:, :max_seq_len] and attend over cache views of max_seq_len + their own scratch.
    max_seq_len: int
    capacity: int  # L, the token buffer's and the cache's length
    cache: "object" = None  # the target's specdec.cache.KVCache; cache.lengths == seq_len - 1 between steps
    active: Tensor | None = None  # [B] long, 1 while the row decodes; a frozen row (0) gains nothing
    # [E, B, N + 1, H]: the target's hidden states after each of the drafter's ``spec.hidden_layers``
    # at the root and every node of the last verification (None when the drafter asks for none).
    hidden: Tensor | None = None
    prompt_end: Tensor | None = None  # [B] long, seq_len right after the prefill (min_new_tokens counts from it)
    # True when this call's prefill gave the drafter the prompt's hidden states (``observe_prefill``).
    prompt_states: bool = False
