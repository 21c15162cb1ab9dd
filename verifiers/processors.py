"""HF's logits processors, applied at every verified and every drafted position with that position's own prefix.

A step verifies the root and every draft node at once. Position 0 (the root) continues the
committed tokens; position ``1 + i`` (node i) continues the committed tokens followed by node
i's ancestors and node i itself (its tree path). Each processor reads exactly that prefix, so
the processed logits at a node equal what HF's processor would give after generating the path,
and the acceptance rule judges draft tokens against the processed target.

Drafters go through the same function (`process_paths`, via `specdec.drafters.draw`): the
draft's logits at a position are processed with the committed tokens plus the draft path so far
before the draft token is picked and its ``q`` is formed. A draft that equals the target then
proposes what the processed target would pick (greedy) and ``q`` equals the processed ``p``
(sampling), so acceptance is not lost to tokens the target can never emit.

Processors, in HF's order: ``repetition_penalty`` (a per-position token-presence mask: the
committed tokens, gathered once, plus the path's tokens), ``no_repeat_ngram_size`` and
``bad_words_ids`` (the last tokens of each position's prefix), then ``min_new_tokens`` and
``suppress_tokens`` (masks). All device work over static shapes, so it runs inside captured
CUDA graphs.

Example::

    opts = LogitsOptions(repetition_penalty=1.1, suppress_tokens=(7,))
    logits = process_logits(logits, opts, tree, state.tokens, state.seq_len, state.start, prompt_end)
    draft = process_paths(draft_logits, opts, DraftPaths.chain(drafted), state.tokens, state.seq_len,
                          state.start, prompt_end)
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


@dataclass
class DraftPaths:
    """The draft tokens between the committed prefix and each of M positions, per row.

    A position's prefix is the row's committed tokens (the root last) followed by
    ``tokens[b, m, :length[b, m]]``, oldest first; entries past ``length`` are ignored.

    Example: a chain drafter choosing its third token has drafted ``[a, b]``:
    ``DraftPaths.chain(torch.stack([a, b], dim=1))`` is one position per row with path ``a b``.
    """

    tokens: Tensor  # [B, M, D] long
    length: Tensor  # [B, M] long, 0 .. D

    @classmethod
    def chain(cls, drafted: Tensor) -> "DraftPaths":
        """One position per row after the chain ``drafted`` ``[B, D]`` (D may be 0: the root)."""
        b, d = drafted.shape
        return cls(drafted.unsqueeze(1), torch.full((b, 1), d, dtype=torch.long, device=drafted.device))

    @classmethod
    def of_tree(cls, tree: DraftTree) -> "DraftPaths":
        """The ``1 + N`` verified positions of ``tree``: the root (empty path), then every node
        (its ancestors and itself, in depth order: ancestors have smaller indices)."""
        b, n, dev = tree.batch, tree.num_nodes, tree.tokens.device
        on_path = torch.cat([torch.zeros(b, 1, n, dtype=torch.bool, device=dev), tree.ancestors], dim=1)
        idx = torch.arange(n, device=dev)
        order = torch.where(on_path, idx, idx + n).argsort(dim=-1)  # [B, 1 + N, N] path nodes first
        tokens = tree.tokens.unsqueeze(1).expand(b, n + 1, n).gather(2, order)
        return cls(tokens, on_path.sum(dim=-1))


def process_logits(logits: Tensor, opts: LogitsOptions, tree: DraftTree, tokens: Tensor, seq_len: Tensor,
                   start: Tensor, prompt_end: Tensor) -> Tensor:
    """``logits`` ``[B, 1 + N, V]`` processed per verified position (the root, then each node with
    its tree path). ``tokens [B, C]`` holds row b's committed tokens at ``start[b]:seq_len[b]``
    (the root last); ``prompt_end [B]`` is seq_len after the prompt."""
    if not opts.active:
        return logits
    return process_paths(logits, opts, DraftPaths.of_tree(tree), tokens, seq_len, start, prompt_end)


def process_paths(logits: Tensor, opts: LogitsOptions, paths: DraftPaths, tokens: Tensor, seq_len: Tensor,
                  start: Tensor, prompt_end: Tensor) -> Tensor:
    """``logits`` ``[B, M, V]`` at M positions, each processed with its own prefix: the committed
    tokens then ``paths`` (see `DraftPaths`). Verification and drafting both come through here."""
    if not opts.active:
        return logits
    b, m, vocab = logits.shape
    x = logits.float()
    if opts.repetition_penalty != 1.0:
        seen = _presence(tokens, seq_len, start, paths, vocab)
        penalised = torch.where(x < 0, x * opts.repetition_penalty, x / opts.repetition_penalty)
        x = torch.where(seen, penalised, x)
    banned = torch.zeros(b, m, vocab + 1, dtype=torch.bool, device=x.device)  # column V: "nothing"
    if opts.no_repeat_ngram_size == 1:  # every token already in the prefix
        banned[..., :vocab] |= _presence(tokens, seq_len, start, paths, vocab)
    if opts.lookback:
        tail, ok, from_tree = _tails(paths, tokens, seq_len, start, opts.lookback + paths.tokens.shape[-1])
        for word in opts.bad_words_ids:
            if len(word) > 1:
                _ban_after(banned, tail, ok, word, vocab)
        if opts.no_repeat_ngram_size > 1:
            _ban_ngrams(banned, tail, ok, from_tree, tokens, seq_len, start, opts.no_repeat_ngram_size, vocab)
    fixed = [w[0] for w in opts.bad_words_ids if len(w) == 1] + list(opts.suppress_tokens)
    if fixed:
        banned |= _id_mask(fixed, vocab + 1, x.device)
    if opts.min_new_tokens and opts.eos_ids:
        young = (seq_len - prompt_end).unsqueeze(1) + paths.length < opts.min_new_tokens  # [B, M]
        banned |= young.unsqueeze(-1) & _id_mask(opts.eos_ids, vocab + 1, x.device)
    return x.masked_fill(banned[..., :vocab], float("-inf"))


def _presence(tokens: Tensor, seq_len: Tensor, start: Tensor, paths: DraftPaths, vocab: int) -> Tensor:
    """``[B, M, V]`` bool: whether each token occurs in the position's prefix."""
    b, m, d = paths.tokens.shape
    slot = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    committed = (slot >= start.unsqueeze(1)) & (slot < seq_len.unsqueeze(1))
    base = torch.zeros(b, vocab + 1, dtype=torch.bool, device=tokens.device)
    base.scatter_(1, torch.where(committed, tokens.clamp(0, vocab - 1), vocab), True)
    seen = base.unsqueeze(1).repeat(1, m, 1)
    real = torch.arange(d, device=tokens.device) < paths.length.unsqueeze(-1)  # [B, M, D]
    seen.scatter_(2, torch.where(real, paths.tokens.clamp(0, vocab - 1), vocab), True)
    return seen[..., :vocab]


def _tails(paths: DraftPaths, tokens: Tensor, seq_len: Tensor, start: Tensor, m: int):
    """The last ``m`` tokens of each position's prefix, oldest first: ``(tail, ok, from_tree)``,
    each ``[B, M, m]``; ``ok`` is False before the prompt's first token, ``from_tree`` marks
    draft tokens (the path's). Back from the path's end, then through the committed tokens."""
    b, n, d = paths.tokens.shape
    back = torch.arange(m - 1, -1, -1, device=tokens.device)  # tokens before the position's end
    length = paths.length.unsqueeze(-1)  # [B, M, 1]
    in_path = back < length  # [B, M, m]
    if d:
        from_path = paths.tokens.gather(2, (length - 1 - back).clamp(0, d - 1))
    else:
        from_path = torch.zeros(b, n, m, dtype=torch.long, device=tokens.device)
    slot = seq_len.view(b, 1, 1) - 1 - (back - length)  # the committed slot when not in the path
    committed = tokens.gather(1, slot.clamp(0, tokens.shape[1] - 1).reshape(b, n * m)).view(b, n, m)
    ok = in_path | (slot >= start.view(b, 1, 1))
    return torch.where(in_path, from_path, committed), ok, in_path


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
