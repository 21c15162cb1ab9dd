"""Replay a drafter over recorded greedy outputs: its exact τ, with no model and no GPU.

Under greedy verification the target's output does not depend on the drafter (that is what
lossless means), so once a greedy output is recorded, how many steps any deterministic drafter
would have taken to produce it follows from the drafter alone: at each step it proposes from the
committed tokens, the step keeps the longest drafted path that agrees with the recorded
continuation, plus the target's own next token. This answers "would another lookup setting
copy more here?" on a laptop, from the tokens a GPU run saved (the harness's rows keep them as
``output_ids``; ``scripts/replay_lookup.py`` replays a run's rows).

Example::

    steps = replay_steps(PromptLookup(8, num_branches=4), prompt_ids, output_ids)
    tau = len(output_ids) / steps
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from specdec.drafters.base import DecodeContext


def accepted_length(tokens: Sequence[int], parents: Sequence[int], valid: Sequence[bool],
                    truth: Sequence[int]) -> int:
    """How many drafted tokens a greedy step keeps: the depth of the deepest node whose whole
    path (root's child first) equals ``truth``, the target's tokens from that step on."""
    depth: list[int] = []
    kept: list[bool] = []
    best = 0
    for i, (tok, parent, ok) in enumerate(zip(tokens, parents, valid)):
        d = 0 if parent < 0 else depth[parent] + 1
        depth.append(d)
        good = bool(ok) and (parent < 0 or kept[parent]) and d < len(truth) and tok == truth[d]
        kept.append(good)
        if good:
            best = max(best, d + 1)
    return best


def replayable(drafter) -> bool:
    """Whether a drafter's proposals follow from the committed tokens alone: a stateless one
    (prompt lookup), or one that says so (``replayable = True``: CopySpec, whose index only reads
    the tokens, with no fallback or a stateless one)."""
    return bool(getattr(drafter, "stateless", False) or getattr(drafter, "replayable", False))


def replay_steps(drafter, prompt: Sequence[int], output: Sequence[int]) -> int:
    """Steps a deterministic drafter whose proposals follow from the committed tokens alone
    (``replayable``) takes to emit ``output`` after ``prompt`` under greedy verification, one
    row at a time. The drafter's ``begin`` sees the prompt, as in the engine."""
    if not replayable(drafter):
        raise ValueError(f"{type(drafter).__name__} keeps state that the tokens do not fix (a draft model's "
                         "cache, a learned head); replay needs a drafter whose proposal depends on the committed "
                         "tokens alone, e.g. PromptLookup or CopySpec")
    if not prompt:
        raise ValueError("replay needs a non-empty prompt")
    full = list(prompt) + list(output)
    width = len(full) + 1

    def context(seq: int) -> DecodeContext:
        tokens = torch.zeros(1, width, dtype=torch.long)
        tokens[0, :seq] = torch.tensor(full[:seq])
        return DecodeContext(target=None, tokens=tokens, seq_len=torch.tensor([seq]), start=torch.tensor([0]),
                             params=None, max_seq_len=width, capacity=width)

    drafter.begin(context(len(prompt)))
    done, steps = 0, 0
    while done < len(output):
        seq = len(prompt) + done
        tree = drafter.propose(context(seq))
        kept = accepted_length(tree.tokens[0].tolist(), tree.parents[0].tolist(), tree.valid[0].tolist(),
                               full[seq:])
        done += min(kept + 1, len(output) - done)
        steps += 1
    return steps
