"""Rapid: retrieval-augmented speculative decoding for long prompts (after RAPID, Chen et al. 2025).

The draft (the target itself, or a smaller model with the same vocabulary) does not read the whole
long prompt. It reads a shortened context of at most ``context_tokens`` tokens per row: the chunks
of the committed text that best match the most recent tokens, in their original order, followed
by the ``recent_tokens`` most recent committed tokens. Its own KV cache is built over that short
context, so each draft forward attends over C slots instead of the full prompt. The target
verifies every draft against the full context, so the output is exactly the target's: the
shortened context only changes how often drafts are accepted.

Retrieval is lexical: a chunk scores the number of distinct token n-grams it shares with the
last ``query_tokens`` committed tokens (ties go to the later chunk). When the batch's acceptance
rate, averaged over the last ``window`` drafted steps, falls below ``refresh_below``, the context is
retrieved again around the current tokens and the draft cache rebuilt (``refreshes`` counts this).

Layout: draft slot ``d`` of row b holds target slot ``d + offset[b]`` for the tokens fed since
the last build; before it, slots ``dstart[b] .. W - 1`` hold the retrieved context (W is the
longest row's). Positions are contiguous in the shortened context. Rollback is as in DraftModel:
each step resets the draft cache length and re-reads the last two committed tokens.

Retrieval runs on the host, so ``spec.device_only`` is False (one step per host sync).
"""
from __future__ import annotations

import torch

from specdec.runner import ModelRunner
from specdec.verifiers.acceptance import StepOutcome
from specdec.verifiers.tree import DraftTree

from .base import DecodeContext, DraftSpec, Drafter, VocabularyMismatchError
from .draw import choose


def retrieve(tokens: list[int], context_tokens: int, chunk: int, recent: int, query: int, ngram: int) -> list[int]:
    """The shortened context of one row: at most ``context_tokens`` tokens.

    Example: 1000 tokens with ``context_tokens=256, chunk=64, recent=64`` give the three chunks
    (of the first 936 tokens) sharing most ``ngram``-grams with the last ``query`` tokens, in
    order, then the last 64 tokens.
    """
    if len(tokens) <= context_tokens:
        return list(tokens)
    recent = min(recent, context_tokens)
    head, tail = tokens[: len(tokens) - recent], tokens[len(tokens) - recent:]
    probe = tokens[-query:]
    wanted = {tuple(probe[i:i + ngram]) for i in range(len(probe) - ngram + 1)}
    chunks = [head[i:i + chunk] for i in range(0, len(head), chunk)]
    scores = []
    for n, c in enumerate(chunks):
        grams = {tuple(c[i:i + ngram]) for i in range(len(c) - ngram + 1)}
        scores.append((len(grams & wanted), n))
    room = context_tokens - recent
    kept, used = [], 0
    for _, n in sorted(scores, reverse=True):
        if used + len(chunks[n]) <= room:
            kept.append(n)
            used += len(chunks[n])
    return [t for n in sorted(kept) for t in chunks[n]] + tail


BUILD_CHUNK = 256  # queries per forward when the draft cache is built over the shortened context


class Rapid(Drafter):
    """Example::

        spec = specdec.wrap(target, drafter=Rapid(num_tokens=4, context_tokens=1024))   # self-draft
        spec = specdec.wrap(target, drafter=Rapid(small_model, num_tokens=4, context_tokens=2048))
    """

    lookback = 2  # the bonus token and the last draft token are new at each step

    def __init__(self, draft_model=None, num_tokens: int = 4, context_tokens: int = 1024, chunk: int = 64,
                 recent_tokens: int | None = None, refresh_below: float = 0.3, window: int = 4,
                 query_tokens: int = 32, ngram: int = 2):
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if chunk < 1 or context_tokens < chunk:
            raise ValueError(f"need 1 <= chunk <= context_tokens, got chunk={chunk}, context_tokens={context_tokens}")
        recent = context_tokens // 4 if recent_tokens is None else recent_tokens
        if not 1 <= recent <= context_tokens:
            raise ValueError(f"recent_tokens must be in 1..context_tokens ({context_tokens}), got {recent}")
        if not 0.0 <= refresh_below <= 1.0 or window < 1:
            raise ValueError(f"refresh_below must be in [0, 1] and window >= 1, got {refresh_below} and {window}")
        if query_tokens < ngram or ngram < 1:
            raise ValueError(f"need 1 <= ngram <= query_tokens, got ngram={ngram}, query_tokens={query_tokens}")
        self.model = draft_model
        self.runner = ModelRunner(draft_model, fuse=None) if draft_model is not None else None
        self.num_tokens, self.context_tokens, self.chunk, self.recent_tokens = num_tokens, context_tokens, chunk, recent
        self.refresh_below, self.window, self.query_tokens, self.ngram = refresh_below, window, query_tokens, ngram
        self._built, self._built_recent = (num_tokens, context_tokens), recent
        self.cache = None
        self.offset = self.dstart = None  # [B] long on the device (see the module docstring)
        self.refreshes = 0  # rebuilds after a low-acceptance window, over this drafter's life
        self.context_lengths: list[int] = []  # [B] shortened-context length of each row at the last build
        self._rates: list[float] = []

    @property
    def spec(self) -> DraftSpec:
        return DraftSpec(num_nodes=self.num_tokens, lookback=self.lookback, device_only=False,
                         forwards_per_step=self.num_tokens)

    def budget_configs(self) -> list[dict]:
        """Draft lengths from the one built down to 1, times context budgets halving from the one
        built down to ``chunk`` (``specdec.memory.fit`` takes the largest that fits)."""
        top_k, top_c = self._built
        contexts = []
        c = top_c
        while c >= self.chunk:
            contexts.append(c)
            c //= 2
        return [{"num_tokens": k, "context_tokens": c} for c in contexts for k in range(top_k, 0, -1)]

    def configure(self, num_tokens: int | None = None, context_tokens: int | None = None) -> None:
        k, c = num_tokens or self.num_tokens, context_tokens or self.context_tokens
        if k < 1 or c < self.chunk:
            raise ValueError(f"need num_tokens >= 1 and context_tokens >= chunk ({self.chunk}), got {k} and {c}")
        self.num_tokens, self.context_tokens = k, c
        self.recent_tokens = min(self._built_recent, c)

    def memory_bytes(self, batch: int, cache_len: int, new_tokens: int) -> int:
        """The draft cache over the shortened context plus the new tokens, and the draft logits."""
        from specdec.memory import kv_slot_bytes

        if self.runner is None:
            raise ValueError("Rapid.memory_bytes needs the drafter bound to a target (specdec.wrap)")
        slots = self.context_tokens + new_tokens + 3 * (self.num_tokens + self.lookback)  # as _build sizes it
        return batch * (slots * kv_slot_bytes(self.runner) + self.num_tokens * self.runner.vocab_size * 4)

    def bind(self, target: ModelRunner) -> None:
        """Self-drafting uses the target's runner (with a cache of its own); a draft model must
        share the target's vocabulary and device."""
        if self.runner is None:
            self.runner = target
            return
        if self.runner.vocab_size != target.vocab_size:
            raise VocabularyMismatchError(
                f"Rapid draft vocabulary ({self.runner.vocab_size} tokens) does not match the target's "
                f"({target.vocab_size}); pass a draft with the target's tokenizer, or draft_model=None")
        if self.runner.device != target.device:
            raise ValueError(f"Rapid draft model is on {self.runner.device} but the target is on {target.device}; "
                             "move both to the same device")

    def begin(self, ctx: DecodeContext) -> None:
        self._rates.clear()
        self._build(ctx)

    def resync(self, ctx: DecodeContext, since: int) -> None:
        """Undrafted steps never fed the draft cache: retrieve and rebuild around the current tokens."""
        self._build(ctx)

    def _build(self, ctx: DecodeContext) -> None:
        """Retrieve each row's shortened context and prefill a fresh draft cache with it."""
        dev, b = ctx.tokens.device, ctx.tokens.shape[0]
        tokens, seq, st = ctx.tokens.tolist(), ctx.seq_len.tolist(), ctx.start.tolist()
        end = [s - self.lookback for s in seq]  # propose re-reads the last `lookback` committed tokens
        short = [retrieve(tokens[r][st[r]:max(st[r], end[r])], self.context_tokens, self.chunk, self.recent_tokens,
                          self.query_tokens, self.ngram) for r in range(b)]
        w = max(1, max(len(s) for s in short))
        self.context_lengths = [len(s) for s in short]
        # A row whose re-read slots are still left padding keeps them before its draft start.
        dstart = [w - len(s) + max(0, st[r] - end[r]) for r, s in enumerate(short)]
        self.offset = torch.tensor([e - w for e in end], dtype=torch.long, device=dev)
        self.dstart = torch.tensor(dstart, dtype=torch.long, device=dev)
        size = w + ctx.capacity - min(end) + self.num_tokens + self.lookback
        if self.cache is None or self.cache.batch != b or self.cache.max_len < size:
            self.cache = None  # the old cache goes before the new one is allocated
            self.cache = self.runner.new_cache(b, size)
        self.cache.start.copy_(self.dstart)
        self.cache.lengths.zero_()
        ids = torch.zeros(b, w, dtype=torch.long, device=dev)
        for r, s in enumerate(short):
            if s:
                ids[r, w - len(s):] = torch.tensor(s, dtype=torch.long, device=dev)
        # In chunks of BUILD_CHUNK queries, so the build's activations stay small beside the cache.
        for lo in range(0, w, BUILD_CHUNK):
            n = min(BUILD_CHUNK, w - lo)
            slots = torch.arange(lo, lo + n, device=dev).expand(b, n)
            among = torch.ones(n, n, dtype=torch.bool, device=dev).tril().expand(b, n, n)
            self.cache.lengths.fill_(lo)
            self.runner.forward(self.cache, ids[:, lo: lo + n], (slots - self.dstart[:, None]).clamp(min=0), slots,
                                among, view_len=lo + n, compute_logits=False)

    def _feed(self, ctx: DecodeContext, tokens, first, view_len: int, logits_at=None):
        """Feed ``tokens`` ``[B, Q]`` at target slots ``first + arange(Q)`` (``first`` ``[B]``),
        causally, after the committed draft slots before them; return the runner's output."""
        b, q, dev = tokens.shape[0], tokens.shape[1], tokens.device
        slots = (first - self.offset).unsqueeze(1) + torch.arange(q, device=dev)
        self.cache.lengths.copy_(first - self.offset)
        among = torch.ones(q, q, dtype=torch.bool, device=dev).tril().expand(b, q, q)
        return self.runner.forward(self.cache, tokens, (slots - self.dstart.unsqueeze(1)).clamp(min=0), slots, among,
                                   view_len=view_len, logits_at=logits_at)

    def propose(self, ctx: DecodeContext) -> DraftTree:
        b, dev, k, w = ctx.tokens.shape[0], ctx.tokens.device, self.num_tokens, self.lookback
        reach = ctx.max_seq_len - int(self.offset.min())  # draft slots this step can touch, plus k
        read = ctx.seq_len.unsqueeze(1) - w + torch.arange(w, device=dev)
        logits = self._feed(ctx, ctx.tokens.gather(1, read), ctx.seq_len - w, reach,
                            logits_at=torch.full((b, 1), w - 1, dtype=torch.long, device=dev)).logits[:, 0]
        drafted, dists = [], []
        for i in range(k):
            if i:  # feed the previous draft token at the next slot
                logits = self._feed(ctx, drafted[-1].unsqueeze(1), ctx.seq_len + i - 1, reach + i).logits[:, -1]
            token, q = choose(ctx, logits, drafted)  # processed with this step's draft so far
            drafted.append(token)
            dists.append(q)
        valid = torch.ones(b, k, dtype=torch.bool, device=dev)
        q = torch.stack(dists, 1) if ctx.params.do_sample else None
        return DraftTree.chain(torch.stack(drafted, dim=1), valid, q=q)

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        """Track the batch's acceptance rate; refresh the context when a window's mean is low."""
        live = ctx.active.bool() if ctx.active is not None else torch.ones_like(outcome.accept_len, dtype=torch.bool)
        rows = int(live.sum())
        if rows == 0:
            return
        self._rates.append(float(outcome.accept_len[live].sum()) / (rows * self.num_tokens))
        if len(self._rates) >= self.window:
            if sum(self._rates[-self.window:]) / self.window < self.refresh_below:
                self.refreshes += 1
                self._rates.clear()
                self._build(ctx)
