"""How a drafter turns its logits into draft tokens and ``q``: the request's logits processors
first, at each draft position with that position's own prefix, then greedy argmax or a draw.

The prefix of a draft position is the row's committed tokens (the root last) followed by the
draft tokens on the way to it: for a chain, the tokens drafted so far in this step; in a tree,
the node's path. The processors are the verifier's (`specdec.verifiers.processors`), so the
draft is judged against, and sampled like, the same processed distribution as the target:
greedy drafts never propose a token the processed target cannot pick (a banned word, a repeated
n-gram), and under sampling ``q`` is the processed, warped distribution each token was really
drawn from, which keeps speculative sampling exact.

With no processor active every function here hands the logits back untouched (no extra work).
All of it is device work over static shapes: it runs inside captured CUDA graphs.

Example (a chain drafter's inner loop)::

    for i in range(k):
        logits = ...                                        # [B, V] the draft's next-token logits
        token, q = choose(state, logits, tokens[:, :i])     # q None when greedy
        tokens[:, i] = token
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.state import DecodeState
from specdec.verifiers.acceptance import sample, warp_probs
from specdec.verifiers.processors import DraftPaths, process_paths
from specdec.verifiers.tree import DraftTree


def processed(state: DecodeState, logits: Tensor, paths: DraftPaths | None,
              vocab_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``(logits, vocab_ids)`` for draft ``logits`` ``[B, M, Vd]`` at M positions with draft
    prefixes ``paths``. ``vocab_ids`` ``[Vd]`` maps a reduced draft vocabulary to target ids
    (None: the target's own). With processors active the logits come back over the target
    vocabulary (tokens outside the draft's are -inf), processed, and ``vocab_ids`` None."""
    opts = state.params.processors
    if not opts.active:
        return logits, vocab_ids
    if paths is None:
        raise ValueError("logits processors are active but the drafter gave no draft paths to process with")
    if vocab_ids is not None:
        logits = to_target_vocab(logits, vocab_ids, state.target.vocab_size)
    return process_paths(logits, opts, paths, state.tokens, state.seq_len, state.start, state.prompt_end), None


def process_chain(state: DecodeState, logits: Tensor, drafted: Tensor | list[Tensor]) -> Tensor:
    """Target-vocabulary logits ``[B, V]`` of a chain's next token after ``drafted`` (``[B, i]``
    or a list of i ``[B]`` tensors), processed with the committed tokens plus ``drafted``."""
    if not state.params.processors.active:
        return logits
    return processed(state, logits.unsqueeze(1), DraftPaths.chain(_stacked(drafted, logits)))[0][:, 0]


def choose(state: DecodeState, logits: Tensor, drafted: Tensor | list[Tensor],
           vocab_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """A chain's next draft token after ``drafted``: ``(token [B] target id, q [B, V] or None)``.

    ``logits`` ``[B, Vd]`` are processed (see `process_chain`), then greedy takes the argmax
    (``q`` None: a point mass) and sampling draws from the warped distribution, which is ``q``."""
    if state.params.processors.active:
        paths = DraftPaths.chain(_stacked(drafted, logits))
        x, vocab_ids = processed(state, logits.unsqueeze(1), paths, vocab_ids)
        logits = x[:, 0]
    if not state.params.do_sample:
        token = logits.argmax(dim=-1)
        return (token if vocab_ids is None else vocab_ids[token]), None
    if vocab_ids is not None:
        logits = to_target_vocab(logits, vocab_ids, state.target.vocab_size)
    q = warp_probs(logits, state.params)
    return sample(q), q


def template_tokens(state: DecodeState, logits: Tensor, parents: Tensor, rank: Tensor, ranks: int,
                    depth: int) -> Tensor:
    """``[B, N]`` tokens of a static tree template (Medusa's choices): node i takes the
    ``rank[i]``-th best of its own logits ``logits[:, i]`` ``[B, N, V]``, processed with its
    parent's path. ``parents`` ``[N]`` (-1: the root), ``ranks`` > max(rank), ``depth`` the
    template's depth. Pass d settles every node of depth d, whose ancestors are settled by then."""
    b, n = logits.shape[:2]
    tokens = torch.zeros(b, n, dtype=torch.long, device=logits.device)
    tree = DraftTree(tokens=tokens, parents=parents.expand(b, n).contiguous(), valid=tokens >= 0)
    up = (parents + 1).expand(b, n)                                    # [B, N] the parent's position
    pick = rank.view(1, n, 1).expand(b, n, 1)
    for _ in range(depth):
        paths = DraftPaths.of_tree(tree)                               # the tokens as they are now
        paths = DraftPaths(paths.tokens.gather(1, up.unsqueeze(-1).expand(b, n, n)), paths.length.gather(1, up))
        x = processed(state, logits, paths)[0]                         # [B, N, V]
        tokens.copy_(x.topk(ranks, dim=-1).indices.gather(2, pick).squeeze(-1))
    return tokens


def to_target_vocab(logits: Tensor, vocab_ids: Tensor, vocab_size: int) -> Tensor:
    """``[..., Vd]`` draft-vocabulary logits as ``[..., vocab_size]``: -inf where the draft has no token."""
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    return full.index_copy(-1, vocab_ids, logits)


def _stacked(drafted: Tensor | list[Tensor], like: Tensor) -> Tensor:
    if isinstance(drafted, Tensor):
        return drafted
    if not drafted:
        return torch.zeros(like.shape[0], 0, dtype=torch.long, device=like.device)
    return torch.stack(drafted, dim=1)
