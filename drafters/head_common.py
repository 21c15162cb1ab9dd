"""What the head drafters share: the prompt's target states (`target_states`), and the checks and
casts every head makes when it is loaded or bound (`check_fits`, `cast`).

``target_states`` re-runs the target's first layers over committed slots for ``resync`` (and
for ``begin`` when the prefill did not hand the prompt's states over), writing only scratch slots past the root, so the committed cache is left as it was.
This module knows the target runner and the engine's state; not heads, trees or acceptance.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import DecodeState, VocabularyMismatchError
from .heads import check_verifier

CHUNK = 256  # queries per catch-up forward in begin/resync


def target_states(state: DecodeState, slots: Tensor, counts: Sequence[int]) -> Tensor:
    """[E, B, Q, H] the target's hidden states after each of ``counts`` layers at committed ``slots`` [B, Q].

    Each query sees the row's committed K/V at slots ``start .. own slot`` from the target's cache
    (its own K/V included) and writes its new K/V into the scratch slots ``seq_len - 1 + i``,
    which no query reads: the committed cache is left as it was. Queries at left padding (or past
    a row's committed length) give garbage that callers never read. Host-side (begin/resync).
    """
    b, q = slots.shape
    dev, runner = slots.device, state.target
    hi = int(state.seq_len.max())
    if q > state.capacity - hi + 1:
        raise ValueError(f"target_states: {q} queries need scratch slots past the root; at most "
                         f"{state.capacity - hi + 1} are free")
    write = state.seq_len.unsqueeze(1) - 1 + torch.arange(q, device=dev)              # [B, Q]
    view = hi + q - 1  # covers the last write slot, hi + q - 2 < capacity
    j = torch.arange(view, device=dev)
    seen = ((j >= state.start[:, None, None]) & (j <= slots[:, :, None])
            & (j < (state.seq_len - 1)[:, None, None]))                                # [B, Q, S]
    empty = ~seen.any(dim=-1, keepdim=True)
    seen |= empty & (j == write[:, :, None])   # a query with nothing to read sees its own write
    among = torch.eye(q, dtype=torch.bool, device=dev).expand(b, q, q)
    out = runner.forward(state.cache, state.tokens.gather(1, slots), (slots - state.start[:, None]).clamp(min=0),
                         write, among, view_len=view, layers=range(max(counts)), compute_logits=False,
                         mask=seen, collect=counts)
    return out.layer_hidden


def chunks(lo: int, hi: int, size: int):
    for a in range(lo, hi, size):
        yield a, min(a + size, hi)


def cast(module, dtype):
    """``module`` in ``dtype`` (a torch dtype or a name such as "bf16"); None or "auto" keep fp32."""
    from specdec.loading import resolve_dtype

    dtype = resolve_dtype(dtype)
    return module if dtype in (None, "auto") else module.to(dtype)


def check_fits(name: str, hidden: int, vocab: int, device, target, verifier: dict) -> None:
    """Raise unless a head of ``hidden`` size and ``vocab`` on ``device``, trained on ``verifier``,
    fits the ``target`` runner."""
    check_verifier(name, verifier, target.config)
    target_hidden = target.config.hidden_size
    if hidden != target_hidden:
        raise ValueError(f"{name}: hidden size {hidden} does not match the target's {target_hidden}")
    if vocab != target.vocab_size:
        raise VocabularyMismatchError(f"{name}: vocabulary of {vocab} tokens does not match the target's "
                                      f"{target.vocab_size}")
    if torch.device(device) != target.device:
        raise ValueError(f"{name} is on {device} but the target is on {target.device}; move the head "
                         "(from_pretrained(..., device=...) or .to(device))")
