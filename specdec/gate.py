"""DraftGate: whether the next run of steps drafts, from the batch size and the measured τ.

It knows counts of tokens and steps on the host; nothing about models or drafters' insides.
"""
from __future__ import annotations


class DraftGate:
    """Whether the next step (or chunk) drafts: two policies, each off when its setting is None.

    - ``max_draft_batch``: with more active rows than this, steps verify the root only (like
      vLLM's ``disable_by_batch_size``: once the target's step is no longer launch-bound,
      drafting rarely pays).
    - ``min_tau``: drafting pays only while a drafted step keeps enough tokens. After each drafted
      window of ``window`` steps the gate compares the tokens kept per active row and step (τ)
      with ``min_tau``; below it, the next ``backoff`` steps run undrafted, then drafting is tried
      again. The backoff doubles on every failed try (up to ``max_backoff``) and falls back to its
      first value when a window pays. Pick ``min_tau`` from the step costs: a drafted step costs
      more device time than a plain one, and drafting at a τ below that cost ratio loses time
      (``docs/RESULTS.md`` records measured ratios). Bursty drafters (lookup) can lose more to a
      pause that misses the next burst than they save.

    Lossless either way: an undrafted step is plain decoding through the same verification.

    Example::

        gate = DraftGate(max_draft_batch=None, min_tau=1.4, window=8)
        if gate.want(n_active): ...      # then, after the step(s):
        gate.record(drafted=True, steps=1, kept=5, row_steps=4)
    """

    def __init__(self, max_draft_batch: int | None = None, min_tau: float | None = None, window: int = 8,
                 backoff: int = 16, max_backoff: int = 256):
        if max_draft_batch is not None and max_draft_batch < 0:
            raise ValueError(f"max_draft_batch must be >= 0 or None, got {max_draft_batch}")
        if min_tau is not None and not 1.0 <= min_tau:
            raise ValueError(f"min_tau must be >= 1 (a step always keeps at least one token) or None, got {min_tau}")
        self.max_draft_batch, self.min_tau = max_draft_batch, min_tau
        self.window, self.first_backoff, self.max_backoff = window, backoff, max_backoff
        self.backoff, self.skip = backoff, 0
        self.kept = self.row_steps = self.steps = 0  # the current drafted window
        self.paused = 0  # drafting pauses the min_tau rule has made (a statistic)
        self.paused_at: int | None = None  # while undrafted: the committed length the pause began at

    def want(self, active: int) -> bool:
        if self.max_draft_batch is not None and active > self.max_draft_batch:
            return False
        return self.skip <= 0

    def decide(self, drafter, state, active: list[bool], seq_host: list[int]) -> bool:
        """Whether the next run of steps drafts. When drafting resumes after undrafted steps, the
        drafter first catches up, through its ``resync(state, since)``, on the tokens committed
        since the pause began (a draft model's KV cache needs it; stateless drafters, and those
        that read new tokens from the buffer anyway, keep the no-op default)."""
        if not drafter.spec.num_nodes:
            return False
        draft = self.want(sum(active))
        if draft and self.paused_at is not None:
            drafter.resync(state, self.paused_at)
            self.paused_at = None
        elif not draft and self.paused_at is None:   # the shortest live row's length when it began
            self.paused_at = min(n for n, a in zip(seq_host, active) if a)
        return draft

    def record(self, drafted: bool, steps: int, kept: int, row_steps: int) -> None:
        """After ``steps`` steps: ``kept`` tokens over ``row_steps`` (active row, step) pairs."""
        if self.min_tau is None:
            return
        if not drafted:
            self.skip -= steps
            return
        self.kept += kept
        self.row_steps += row_steps
        self.steps += steps
        if self.steps < self.window:
            return
        tau = self.kept / max(self.row_steps, 1)
        self.kept = self.row_steps = self.steps = 0
        if tau < self.min_tau:
            self.skip = self.backoff
            self.backoff = min(2 * self.backoff, self.max_backoff)
            self.paused += 1
        else:
            self.backoff = self.first_backoff
