"""CopySpec: draft long runs copied from earlier in the conversation, else ask a fallback drafter.

After Dumitru et al. (2025), "CopySpec: Accelerating LLMs with Speculative Copy-and-Paste".
Each row keeps, on the host, an index of its whole history (the prompt, which for a chat holds
every earlier turn and answer, plus everything generated so far): a polynomial rolling hash of
every γ-gram maps to the index right after that γ-gram's most recent occurrence. At each step
the row's last γ tokens are looked up; on a verified match the drafter copies the (up to) K
tokens that followed it as one chain. Rows without a match get the fallback drafter's tree, or
no draft at all.

Host work per step is O(new tokens + K) per row: the index reads the prompt once in ``begin``,
then only the tokens committed since the previous step (one small device-to-host copy). A hash
match is always compared against the real tokens before anything is copied, so collisions can
cost a missed draft but never a wrong one (and a draft is verified by the target anyway).

Choices:
- Copying past the end of the history repeats the matched text periodically: if the last γ
  tokens also occur p tokens earlier, the text is taken to repeat with period p. A run of fewer
  than K real tokens therefore still yields K draft tokens, which pays off in loops.
- With ``memory=True`` the drafter remembers the rows of its earlier ``generate`` calls (prompt
  plus output) and copies from them when a row's own history has no match. Off by default: a
  benchmark that decodes the same prompt twice (warm-up, then timing) would copy its own answer.
- Rows that finished (no token committed since the last step) draft nothing.
- A stateful fallback is asked every step, so its state follows the committed tokens as it
  expects. A DraftModel re-reads only its last few committed tokens, though: where a row accepted
  a copy longer than its own draft, its cache holds K/V of tokens it drafted, not of the copied
  ones. Outputs stay exact (the target verifies everything); its later drafts may be weaker.
- On CPU, node columns that no row uses are cut off, so a step without any draft costs a plain
  decoding step; on CUDA the node budget stays static (a capturable verify step).

This module knows token ids only: nothing about tokenizers or chat templates.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from specdec.verifiers.acceptance import StepOutcome
from specdec.verifiers.tree import DraftTree

from .base import DecodeContext, DraftSpec, Drafter

MODULUS = (1 << 61) - 1  # a Mersenne prime: collisions between two γ-grams have probability ~ γ / 2^61
BASE = 1_000_003


class GramIndex:
    """A growing token sequence and, for each of its γ-grams, where the latest occurrence ended.

    ``table[h]`` is the index right after the latest γ-gram with hash h that has a continuation;
    ``roll`` is the hash of the last γ tokens (the current suffix).

    Example::

        idx = GramIndex(gamma=2)
        idx.extend([5, 6, 7, 5, 6])
        idx.match()       # 2: the suffix "5 6" occurred before and was followed by index 2 (7)
        idx.copy(2, 4)    # [7, 5, 6, 7]: past the end, the text repeats with period 3
    """

    def __init__(self, gamma: int, modulus: int = MODULUS, base: int = BASE):
        self.gamma, self.modulus, self.base = gamma, modulus, base
        self.tokens: list[int] = []
        self.table: dict[int, int] = {}
        self.roll = 0
        self._top = pow(base, gamma - 1, modulus)  # weight of the oldest token of a window

    def hash(self, gram: list[int]) -> int:
        """The polynomial hash sum(gram[i] * base^(γ-1-i)) mod modulus, computed from scratch."""
        h = 0
        for t in gram:
            h = (h * self.base + t) % self.modulus
        return h

    def extend(self, new: list[int]) -> None:
        """Append tokens; each γ-gram enters the table once the token after it is known."""
        g, m, tokens = self.gamma, self.modulus, self.tokens
        for t in new:
            n = len(tokens)
            if n >= g:
                self.table[self.roll] = n  # the γ-gram ending at n is followed by token n
                self.roll = ((self.roll - tokens[n - g] * self._top) * self.base + t) % m
            else:
                self.roll = (self.roll * self.base + t) % m
            tokens.append(t)

    def find(self, gram: list[int], h: int) -> int | None:
        """Index after the latest occurrence of ``gram`` (hash ``h``), verified token by token."""
        j = self.table.get(h)
        if j is None or self.tokens[j - self.gamma: j] != gram:
            return None  # absent, or a hash collision
        return j

    def suffix(self) -> list[int] | None:
        return self.tokens[-self.gamma:] if len(self.tokens) >= self.gamma else None

    def match(self) -> int | None:
        """Where the current suffix occurred before: the index that followed it, or None."""
        gram = self.suffix()
        return None if gram is None else self.find(gram, self.roll)

    def copy(self, j: int, k: int, periodic: bool = True) -> list[int]:
        """Up to ``k`` tokens from index ``j``; ``periodic`` repeats ``tokens[j:]`` past the end."""
        out = self.tokens[j: j + k]
        period = len(self.tokens) - j
        while periodic and len(out) < k:
            out.append(out[len(out) - period])
        return out


class CopySpec(Drafter):
    """Example::

        CopySpec(gamma=3, num_tokens=16)                                  # copy only
        CopySpec(fallback=PromptLookup(num_tokens=4))                     # copy, else lookup
        CopySpec(fallback={"_target_": "specdec.drafters.PromptLookup", "num_tokens": 4})

    ``gamma`` is the γ-gram length that must match, ``num_tokens`` (K) the most tokens copied per
    step. ``fallback`` is a Drafter, a drafter config mapping (built with ``build_drafter``), or
    None. A stateful fallback (one without ``stateless = True``, e.g. a DraftModel that keeps its
    own cache) is asked every step; a stateless one only when some row has no match.
    ``memory=True`` keeps earlier calls' rows (at most ``memory_tokens`` tokens, oldest dropped
    first) to copy from.

    ``device``: find the match on the device instead (one vectorised pass over each row's whole
    history per step, the same latest-occurrence rule and periodic copy, no host index), so the
    drafter is device-only and runs inside captured steps; the fallback is then asked every step
    and must be device-only too. Default (None): on unless ``memory`` (which needs the host index)
    or a host-bound fallback rules it out.
    """

    def __init__(self, gamma: int = 3, num_tokens: int = 16, fallback=None, memory: bool = False,
                 memory_tokens: int = 1_000_000, device: bool | None = None):
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if isinstance(fallback, Mapping):
            from . import build_drafter  # here, not at import time: the package imports this module

            fallback = build_drafter(fallback)
        if fallback is not None and not isinstance(fallback, Drafter):
            raise TypeError(f"fallback must be a Drafter, a drafter config or None; got {type(fallback).__name__}")
        host_fallback = fallback is not None and not fallback.spec.device_only
        if device is None:
            device = not memory and not host_fallback
        if device and (memory or host_fallback):
            why = "memory=True keeps a host index of earlier calls" if memory else \
                f"its fallback {type(fallback).__name__} needs the host every step"
            raise ValueError(f"CopySpec(device=True) cannot run: {why}; pass device=False")
        self.device = device
        self.gamma = gamma
        self.num_tokens = num_tokens
        self.fallback = fallback
        self.memory = memory
        self.memory_tokens = memory_tokens
        self._memory_docs: list[list[int]] = []
        self._memory = GramIndex(gamma)
        self._rows: list[GramIndex] = []  # [B] each row's real tokens so far, indexed
        self._known: list[int] = []  # [B] buffer length each row's index has read up to
        self._done: list[bool] = []  # [B] no token committed in the last step: the row has finished
        self._last: tuple | None = None  # the previous call's (tokens, seq_len) buffers, for memory
        self._fallback_called = False
        self._proposals = 0
        self.copied_steps = 0  # row-steps that drafted a copy, this call (for inspection)

    # ------------------------------------------------------------------ the protocol
    @property
    def replayable(self) -> bool:
        """Its proposals follow from this call's committed tokens alone (its index reads nothing
        else), unless it remembers earlier calls or a fallback keeps state of its own:
        ``specdec.bench.replay`` can then reproduce them."""
        return not self.memory and (self.fallback is None or bool(getattr(self.fallback, "stateless", False)))

    @property
    def spec(self) -> DraftSpec:
        """Device-only with ``device``; otherwise the index lives on the host and is read every
        step (one step per sync, eagerly). The rest is the fallback's: its node budget (if
        larger), lookback, scratch, hidden states."""
        fb = self.fallback.spec if self.fallback is not None else DraftSpec(num_nodes=0)
        return DraftSpec(num_nodes=max(self.num_tokens, fb.num_nodes), lookback=fb.lookback,
                         scratch_slots=fb.scratch_slots, device_only=self.device, hidden_layers=fb.hidden_layers,
                         forwards_per_step=fb.forwards_per_step)

    @property
    def num_nodes(self) -> int:
        return self.spec.num_nodes

    def bind(self, target) -> None:
        if self.fallback is not None:
            self.fallback.bind(target)
            if self.device and not self.fallback.spec.device_only:
                raise ValueError(f"CopySpec(device=True) cannot use the fallback {type(self.fallback).__name__}, "
                                 "which needs the host every step; pass device=False")

    def resync(self, ctx: DecodeContext, since: int) -> None:
        if self.fallback is not None:
            self.fallback.resync(ctx, since)

    def begin(self, ctx: DecodeContext) -> None:
        if self.device:
            self._fallback_called = self.fallback is not None
            if self.fallback is not None:
                self.fallback.begin(ctx)
            return
        if self.memory and self._last is not None:
            self._remember(*self._last)
        b, n = ctx.tokens.shape[0], ctx.max_seq_len
        host = torch.cat([ctx.tokens[:, :n], ctx.start.unsqueeze(1), ctx.seq_len.unsqueeze(1)], dim=1).tolist()
        self._rows, self._known = [], []
        for row in host:
            *tokens, start, seq = row
            index = GramIndex(self.gamma)
            index.extend(tokens[start:seq])
            self._rows.append(index)
            self._known.append(seq)
        self._done = [False] * b
        self._last = (ctx.tokens, ctx.seq_len)
        self._proposals = self.copied_steps = 0
        if self.fallback is not None:
            self.fallback.begin(ctx)

    def propose(self, ctx: DecodeContext) -> DraftTree:
        if self.device:
            copy, found = self._device_copy(ctx)
            fb = self.fallback.propose(ctx) if self.fallback is not None else None
            return self._merge_tensors(copy, found.long() * self.num_tokens, fb, ctx.tokens.device, cut=False)
        self._read_new_tokens(ctx, after_step=self._proposals > 0)
        self._proposals += 1
        copies = [[] if done else self._copy(index) for index, done in zip(self._rows, self._done)]
        copied = [bool(c) for c in copies]
        self.copied_steps += sum(copied)
        ask = self.fallback is not None and not (all(copied) and getattr(self.fallback, "stateless", False))
        fallback_tree = self.fallback.propose(ctx) if ask else None
        self._fallback_called = ask
        return self._merge(copies, fallback_tree, ctx)

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        # The fallback sees the merged tree: its own nodes keep their indices there.
        if self._fallback_called:
            self.fallback.observe(ctx, outcome)

    def forget(self) -> None:
        """Drop the cross-call memory."""
        self._memory_docs, self._memory, self._last = [], GramIndex(self.gamma), None

    # ------------------------------------------------------------------ helpers
    def _copy(self, index: GramIndex) -> list[int]:
        """The draft of one row: a copy after its own latest match, else after one in memory."""
        j = index.match()
        if j is not None:
            return index.copy(j, self.num_tokens)
        if not self._memory.table or (gram := index.suffix()) is None:
            return []
        j = self._memory.find(gram, index.roll)
        if j is None:
            return []
        out = self._memory.copy(j, self.num_tokens, periodic=False)
        return out[: out.index(-1)] if -1 in out else out  # stop at the end of that document

    def _read_new_tokens(self, ctx: DecodeContext, after_step: bool) -> None:
        """Extend each row's index with the tokens committed since the last read.

        One device-to-host copy of each row's last ``num_nodes + 1`` slots (the most one step can
        commit) and its length; a row that gained more (steps taken without drafting) reads the rest.
        ``after_step``: a step ran since the last read, so a row that gained nothing has finished.
        """
        w = self.num_nodes + 1
        tail = (ctx.seq_len.unsqueeze(1) - w + torch.arange(w, device=ctx.tokens.device)).clamp(min=0)
        host = torch.cat([ctx.tokens.gather(1, tail), ctx.seq_len.unsqueeze(1)], dim=1).tolist()
        for r, row in enumerate(host):
            seq = row[w]
            new = seq - self._known[r]
            self._done[r] = after_step and new <= 0
            if new <= 0:
                continue
            fresh = row[w - new: w] if new <= w else ctx.tokens[r, self._known[r]: seq].tolist()
            self._rows[r].extend(fresh)
            self._known[r] = seq

    def _device_copy(self, ctx: DecodeContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The latest earlier occurrence of each row's last γ tokens, on the device: the ``[B, K]``
        tokens after it (repeating periodically past the end, as the host index does) and
        whether the row has a match ``[B]``."""
        g, k = self.gamma, self.num_tokens
        tokens = ctx.tokens[:, : ctx.max_seq_len]
        b, length = tokens.shape
        dev = tokens.device
        seq, start = ctx.seq_len.unsqueeze(1), ctx.start.unsqueeze(1)  # [B, 1]
        suffix = tokens.gather(1, (seq - g + torch.arange(g, device=dev)).clamp(min=0))  # [B, g]
        # windows[:, e] holds tokens e - g .. e - 1: the γ-gram that ends just before slot e.
        windows = torch.nn.functional.pad(tokens, (g, 0), value=-1).unfold(1, g, 1)  # [B, L + 1, g]
        end = torch.arange(length + 1, device=dev).unsqueeze(0)  # [1, L + 1]
        ok = (windows == suffix.unsqueeze(1)).all(dim=-1) & (end - g >= start) & (end < seq) & (seq - g >= start)
        best = torch.where(ok, end, -1).max(dim=1).values  # [B] where the copy starts, -1: no match
        period = (seq.squeeze(1) - best).clamp(min=1)  # the suffix recurs this many tokens later
        idx = best.unsqueeze(1) + torch.arange(k, device=dev) % period.unsqueeze(1)  # [B, K]
        return tokens.gather(1, idx.clamp(0, length - 1)), best >= 0

    def _merge(self, copies: list[list[int]], fb: DraftTree | None, ctx: DecodeContext) -> DraftTree:
        """Rows with a copy take it as a chain; the others take the fallback's tree (or nothing)."""
        n, dev = self.num_nodes, ctx.tokens.device
        tok = torch.tensor([c + [0] * (n - len(c)) for c in copies], dtype=torch.long).to(dev)  # [B, N]
        lengths = torch.tensor([len(c) for c in copies]).to(dev)  # [B]
        return self._merge_tensors(tok, lengths, fb, dev, cut=dev.type != "cuda")

    def _merge_tensors(self, tok: torch.Tensor, lengths: torch.Tensor, fb: DraftTree | None, dev, cut: bool) -> DraftTree:
        """``tok`` ``[B, <= N]`` copies of ``lengths`` ``[B]`` tokens as chains, else the fallback's
        tree. Both are padded with invalid nodes to ``num_nodes``; the fallback's nodes keep their
        indices. ``cut``: drop node columns no row uses (host mode on CPU)."""
        b, n, k = tok.shape[0], self.num_nodes, self.num_tokens
        tok = _pad(tok, n - tok.shape[1], 0)
        node = torch.arange(n, device=dev)
        parents = torch.where(node < k, node - 1, torch.full_like(node, -1)).expand(b, n)
        valid = node.unsqueeze(0) < lengths.unsqueeze(1)
        q = None
        if fb is not None:
            pad = n - fb.num_nodes
            use_copy = (lengths > 0).unsqueeze(1)  # [B, 1]
            tok = torch.where(use_copy, tok, _pad(fb.tokens, pad, 0))
            parents = torch.where(use_copy, parents, _pad(fb.parents, pad, -1))
            valid = torch.where(use_copy, valid, _pad(fb.valid, pad, False))
            if fb.q is not None:  # a copied token is a point mass: q is one-hot there
                one_hot = torch.nn.functional.one_hot(tok, fb.q.shape[-1]).to(fb.q.dtype)
                q = torch.where(use_copy.unsqueeze(2), one_hot, _pad(fb.q, pad, 0.0))
        if cut:  # cut the node columns no row uses
            used = int(valid.any(dim=0).nonzero().max()) + 1 if bool(valid.any()) else 0
            tok, parents, valid = tok[:, :used], parents[:, :used], valid[:, :used]
            q = q[:, :used] if q is not None else None
        return DraftTree(tokens=tok.contiguous(), parents=parents.contiguous(), valid=valid.contiguous(), q=q)

    def _remember(self, tokens: torch.Tensor, seq_len: torch.Tensor) -> None:
        """Add the previous call's rows (prompt + output) to the cross-call memory."""
        for r, index in enumerate(self._rows):
            seq = int(seq_len[r])
            if seq > self._known[r]:
                index.extend(tokens[r, self._known[r]: seq].tolist())
            self._memory_docs.append(index.tokens)
            self._memory.extend(index.tokens + [-1])  # -1 ends a document: no real γ-gram spans two
        if len(self._memory.tokens) > self.memory_tokens:  # drop the oldest documents, re-index the rest
            while sum(len(d) + 1 for d in self._memory_docs) > self.memory_tokens and len(self._memory_docs) > 1:
                self._memory_docs.pop(0)
            self._memory = GramIndex(self.gamma)
            for doc in self._memory_docs:
                self._memory.extend(doc + [-1])


def _pad(x: torch.Tensor, pad: int, value) -> torch.Tensor:
    """Pad dim 1 of ``x`` ([B, N] or [B, N, V]) with ``pad`` entries of ``value``."""
    if pad == 0:
        return x
    shape = (x.shape[0], pad, *x.shape[2:])
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim=1)
