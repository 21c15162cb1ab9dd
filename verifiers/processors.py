"""HF's logits processors, applied to every verified position with that position's own prefix.

A step verifies the root and every draft node at once. Position 0 (the root) continues the
committed tokens; position ``1 + i`` (node i) continues the committed tokens followed by node
i's ancestors and node i itself (its tree path). Each processor reads exactly that prefix, so
the processed logits at a node equal what HF's processor would give after generating the path,
and the acceptance rule judges draft tokens against the processed target.

Processors, in HF's order: ``repetition_penalty`` (a per-position token-presence mask: the
committed tokens, gathered once, plus the path's tokens), ``no_repeat_ngram_size`` and
``bad_words_ids`` (the last tokens of each position's prefix, walked up the tree), then
``min_new_tokens`` and ``suppress_tokens`` (masks). All device work over static shapes, so it
runs inside captured CUDA graphs. The draft's q is left as drawn: speculative sampling stays
exact for any q the draft tokens were really drawn from.

Example::

    opts = LogitsOptions(repetition_penalty=1.1, suppress_tokens=(7,))
    logits = process_logits(logits, opts, tree, state.tokens, state.seq_len, state.start, prompt_end)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .tree import DraftTree


@dataclass(frozen=True)
class LogitsOptions:
    """The HF logits processors a step applies (hashable: captured graphs are keyed by it)."""

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    eos_ids: tuple[int, ...] = ()  # what min_new_tokens holds back
    suppress_tokens: tuple[int, ...] = ()
    bad_words_ids: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0 or self.min_new_tokens < 0:
            raise ValueError("no_repeat_ngram_size and min_new_tokens must be >= 0")
        if any(len(w) == 0 for w in self.bad_words_ids):
            raise ValueError("bad_words_ids holds an empty sequence; every banned word needs at least one token")

    @property
    def active(self) -> bool:
        return bool(self.repetition_penalty != 1.0 or self.no_repeat_ngram_size or self.min_new_tokens
                    or self.suppress_tokens or self.bad_words_ids)

    @property
    def lookback(self) -> int:
        """Prefix tokens (ending at a position) the n-gram and bad-word rules compare."""
        longest = max((len(w) for w in self.bad_words_ids), default=1)
        return max(self.no_repeat_ngram_size - 1, longest - 1, 0)


def _id_mask(values, width: int, device: torch.device) -> Tensor:
    """``[width]`` bool, True at ``values``. Built on the device from Python scalars, never copied
    from the host, so a CUDA-graph capture may record it."""
    cols = torch.arange(width, device=device)
    mask = torch.zeros(width, dtype=torch.bool, device=device)
    for v in sorted(set(values)):
        mask |= cols == v
    return mask


def process_logits(logits: Tensor, opts: LogitsOptions, tree: DraftTree, tokens: Tensor, seq_len: Tensor,
                   start: Tensor, prompt_end: Tensor) -> Tensor:
    """``logits`` ``[B, 1 + N, V]`` processed per position. ``tokens [B, C]`` holds row b's committed
    tokens at ``start[b]:seq_len[b]`` (the root last); ``prompt_end [B]`` is seq_len after the prompt."""
    if not opts.active:
        return logits
    b, n, vocab = tree.batch, tree.num_nodes, logits.shape[-1]
    x = logits.float()
    # [B, 1 + N, N]: the tree nodes on each position's path (none for the root)
    on_path = torch.cat([torch.zeros(b, 1, n, dtype=torch.bool, device=x.device), tree.ancestors], dim=1)
    if opts.repetition_penalty != 1.0:
        seen = _presence(tokens, seq_len, start, tree, on_path, vocab)
        penalised = torch.where(x < 0, x * opts.repetition_penalty, x / opts.repetition_penalty)
        x = torch.where(seen, penalised, x)
    banned = torch.zeros(b, n + 1, vocab + 1, dtype=torch.bool, device=x.device)  # column V: "nothing"
    if opts.no_repeat_ngram_size == 1:  # every token already in the prefix
        banned[..., :vocab] |= _presence(tokens, seq_len, start, tree, on_path, vocab)
    if opts.lookback:
        tail, ok, from_tree = _tails(tree, tokens, seq_len, start, opts.lookback + n)
        for word in opts.bad_words_ids:
            if len(word) > 1:
                _ban_after(banned, tail, ok, word, vocab)
        if opts.no_repeat_ngram_size > 1:
            _ban_ngrams(banned, tail, ok, from_tree, tokens, seq_len, start, opts.no_repeat_ngram_size, vocab)
    fixed = [w[0] for w in opts.bad_words_ids if len(w) == 1] + list(opts.suppress_tokens)
    if fixed:
        banned |= _id_mask(fixed, vocab + 1, x.device)
    if opts.min_new_tokens and opts.eos_ids:
        depth = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=x.device), tree.depth], dim=1)
        young = (seq_len - prompt_end).unsqueeze(1) + depth < opts.min_new_tokens  # [B, 1 + N]
        banned |= young.unsqueeze(-1) & _id_mask(opts.eos_ids, vocab + 1, x.device)
    return x.masked_fill(banned[..., :vocab], float("-inf"))


def _presence(tokens: Tensor, seq_len: Tensor, start: Tensor, tree: DraftTree, on_path: Tensor,
              vocab: int) -> Tensor:
    """``[B, 1 + N, V]`` bool: whether each token occurs in the position's prefix."""
    b, n = tree.batch, tree.num_nodes
    slot = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    committed = (slot >= start.unsqueeze(1)) & (slot < seq_len.unsqueeze(1))
    base = torch.zeros(b, vocab + 1, dtype=torch.bool, device=tokens.device)
    base.scatter_(1, torch.where(committed, tokens.clamp(0, vocab - 1), vocab), True)
    seen = base.unsqueeze(1).repeat(1, n + 1, 1)
    path_tokens = tree.tokens.clamp(0, vocab - 1).unsqueeze(1).expand(b, n + 1, n)
    seen.scatter_(2, torch.where(on_path, path_tokens, vocab), True)
    return seen[..., :vocab]


def _tails(tree: DraftTree, tokens: Tensor, seq_len: Tensor, start: Tensor, m: int):
    """The last ``m`` tokens of each position's prefix, oldest first: ``(tail, ok, from_tree)``,
    each ``[B, 1 + N, m]``; ``ok`` is False before the prompt's first token, ``from_tree`` marks
    draft-node tokens. Walks up the tree from each position, then back through the committed ones."""
    b, n, dev = tree.batch, tree.num_nodes, tokens.device
    node_tok = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), tree.tokens], dim=1)  # [B, 1 + N]
    up = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), (tree.parents + 1).clamp(0, n)], dim=1)
    cur = torch.arange(n + 1, device=dev).expand(b, n + 1)  # 0: in the committed tokens
    back = torch.zeros(b, n + 1, dtype=torch.long, device=dev)  # committed tokens already walked past
    out, ok, from_tree = [], [], []
    for _ in range(m):
        in_tree = cur > 0
        slot = seq_len.unsqueeze(1) - 1 - back
        out.append(torch.where(in_tree, node_tok.gather(1, cur), tokens.gather(1, slot.clamp(min=0))))
        ok.append(in_tree | (slot >= start.unsqueeze(1)))
        from_tree.append(in_tree)
        back = torch.where(in_tree, back, back + 1)
        cur = torch.where(in_tree, up.gather(1, cur), cur)
    return (torch.stack(out[::-1], dim=-1), torch.stack(ok[::-1], dim=-1), torch.stack(from_tree[::-1], dim=-1))


def _ban_after(banned: Tensor, tail: Tensor, ok: Tensor, word: tuple[int, ...], vocab: int) -> None:
    """Ban ``word[-1]`` where the prefix ends with ``word[:-1]`` (HF's multi-token bad words)."""
    if not 0 <= word[-1] < vocab:
        return
    k = len(word) - 1
    hit = ok[..., -k:].all(dim=-1)
    for j, t in enumerate(word[:-1]):
        hit = hit & (tail[..., j - k] == t)
    banned[..., word[-1]] |= hit


def _ban_ngrams(banned: Tensor, tail: Tensor, ok: Tensor, from_tree: Tensor, tokens: Tensor, seq_len: Tensor,
                start: Tensor, size: int, vocab: int) -> None:
    """Ban every token that would repeat an n-gram of the prefix (HF's ``no_repeat_ngram_size`` > 1).

    An earlier n-gram whose last token is committed is found among the committed windows (shared
    by all positions); one whose last token is on the tree path is found in the position's tail."""
    k = size - 1
    query, query_ok = tail[..., -k:], ok[..., -k:].all(dim=-1)  # [B, 1 + N, k]
    _ban_committed(banned, tokens, seq_len, start, query, k, vocab, query_ok)
    m = tail.shape[-1]
    for end in range(k, m):  # the window tail[end - k: end], followed by tail[end]
        win, win_ok = tail[..., end - k: end], ok[..., end - k: end + 1].all(dim=-1)
        hit = (win == query).all(dim=-1) & win_ok & query_ok & from_tree[..., end]
        banned.scatter_(2, torch.where(hit, tail[..., end], vocab).unsqueeze(-1), True)


def _ban_committed(banned: Tensor, tokens: Tensor, seq_len: Tensor, start: Tensor, query: Tensor | None, k: int,
                   vocab: int, query_ok: Tensor | None = None) -> None:
    """Ban ``tokens[i]`` for each committed slot i whose k predecessors equal the position's query."""
    c = tokens.shape[1]
    slot = torch.arange(c, device=tokens.device).unsqueeze(0)
    valid = (slot - k >= start.unsqueeze(1)) & (slot < seq_len.unsqueeze(1))  # [B, C]
    hit = valid.unsqueeze(1).expand(-1, banned.shape[1], -1)  # [B, 1 + N, C]
    for o in range(k):  # the window's o-th token sits at slot i - k + o
        shifted = torch.roll(tokens, shifts=k - o, dims=1)
        hit = hit & (shifted.unsqueeze(1) == query[..., o: o + 1])
    if query_ok is not None:
        hit = hit & query_ok.unsqueeze(-1)
    nxt = tokens.clamp(0, vocab - 1).unsqueeze(1).expand_as(hit)
    banned.scatter_(2, torch.where(hit, nxt, vocab), True)
