"""DraftGate: whether the next run of steps drafts, from the batch size, the measured τ and, with
``min_tau="auto"``, the measured cost of drafted and undrafted runs.

It knows counts of tokens and steps, and seconds, on the host; nothing about models or drafters'
insides.
"""
from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"  # min_tau's measured setting


@dataclass
class RunCosts:
    """Seconds per step of drafted and of undrafted runs as measured so far (None before the
    first): a moving average in which each run counts by its steps. The engine keeps one per
    batch size, cache and rule, so a call starts from what the calls before it measured.

    Example::

        costs = RunCosts()
        costs.add(drafted=False, seconds=0.008, steps=8)
        costs.add(drafted=True, seconds=0.0104, steps=8)
        costs.ratio  # 1.3: a drafted step costs 1.3 plain ones
    """

    drafted: float | None = None  # seconds per drafted step
    plain: float | None = None  # seconds per undrafted step
    memory: float = 0.9  # per step measured, the share of the old average that stays

    def add(self, drafted: bool, seconds: float, steps: int) -> None:
        per = seconds / steps
        old = self.drafted if drafted else self.plain
        new = per if old is None else per + (old - per) * self.memory ** steps
        if drafted:
            self.drafted = new
        else:
            self.plain = new

    @property
    def ratio(self) -> float | None:
        """A drafted step's cost in undrafted steps; None until both are measured."""
        if self.drafted is None or not self.plain:
            return None
        return self.drafted / self.plain


def check_min_tau(min_tau) -> None:
    """``min_tau`` is None, a number >= 1, or ``"auto"``; anything else raises, naming them."""
    if min_tau is None or min_tau == AUTO:
        return
    if isinstance(min_tau, str):
        raise ValueError(f"min_tau must be a number >= 1, 'auto' (measure the step costs) or None, got {min_tau!r}")
    if isinstance(min_tau, bool) or not isinstance(min_tau, (int, float)) or not 1.0 <= min_tau:
        raise ValueError(f"min_tau must be >= 1 (a step always keeps at least one token), 'auto' or None, "
                         f"got {min_tau!r}")


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
    - ``min_tau="auto"``: the same rule with the threshold measured. Drafting pays when drafted
      tokens per second beat undrafted ones; an undrafted step keeps exactly one token a row, so
      that is when τ beats ``costs.ratio``, a drafted step's cost in undrafted steps. Each run's
      cost comes with its results (``record(..., cost=)``): device time between CUDA events around
      its launch, read once the run is read back (no extra sync), or the host clock on CPU.
      The undrafted cost is measured first: while ``costs.plain`` is unknown, the call starts with
      one undrafted run (plain decoding, so no slower than the baseline); later calls that share
      ``costs`` reuse it, and every undrafted run (a pause, or the batch policy) refreshes it.
      Hysteresis: a window while drafting pauses only below the ratio, but the first window
      after a pause (the probe) resumes drafting only at ``1 + hysteresis`` times the ratio, so a
      drafter near break-even stays off and is probed ever more rarely (the doubling backoff).
      Until the ratio is known (no costs given) windows give no verdict.

    Lossless either way: an undrafted step is plain decoding through the same verification.

    Example::

        gate = DraftGate(max_draft_batch=None, min_tau=1.4, window=8)
        if gate.want(n_active): ...      # then, after the step(s):
        gate.record(drafted=True, steps=1, kept=5, row_steps=4)
    """

    def __init__(self, max_draft_batch: int | None = None, min_tau: float | str | None = None, window: int = 8,
                 backoff: int = 16, max_backoff: int = 256, costs: RunCosts | None = None,
                 hysteresis: float = 0.05):
        if max_draft_batch is not None and max_draft_batch < 0:
            raise ValueError(f"max_draft_batch must be >= 0 or None, got {max_draft_batch}")
        check_min_tau(min_tau)
        self.max_draft_batch, self.min_tau, self.auto = max_draft_batch, min_tau, min_tau == AUTO
        self.costs, self.hysteresis = costs if costs is not None else RunCosts(), hysteresis
        self.window, self.first_backoff, self.max_backoff = window, backoff, max_backoff
        self.backoff, self.skip = backoff, 0
        if self.auto and self.costs.plain is None:
            self.skip = 1  # one undrafted run first: its cost is the yardstick
        self.kept = self.row_steps = self.steps = 0  # the current drafted window
        self.paused = 0  # drafting pauses the min_tau rule has made (a statistic)
        self.probing = False  # the current drafted window is the first after a pause
        self.paused_at: int | None = None  # while undrafted: the committed length the pause began at

    def want(self, active: int, pending: int = 0) -> bool:
        """Whether a run with ``active`` live rows drafts, once the ``pending`` undrafted steps in
        flight (launched, not yet recorded) are recorded."""
        if self.max_draft_batch is not None and active > self.max_draft_batch:
            return False
        return self.skip - pending <= 0

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

    def record(self, drafted: bool, steps: int, kept: int, row_steps: int, cost: float | None = None) -> None:
        """After ``steps`` steps: ``kept`` tokens over ``row_steps`` (active row, step) pairs, in
        ``cost`` seconds (``min_tau="auto"`` reads it; None: not measured)."""
        if self.min_tau is None:
            return
        if cost is not None:
            self.costs.add(drafted, cost, steps)
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
        self._verdict(tau)

    def _verdict(self, tau: float) -> None:
        """Pause (with a doubling backoff) after a drafted window whose τ did not pay."""
        need = self.min_tau
        if self.auto:
            if self.costs.ratio is None:
                return
            need = self.costs.ratio * (1 + self.hysteresis if self.probing else 1)
        if tau < need:
            self.skip = self.backoff
            self.backoff = min(2 * self.backoff, self.max_backoff)
            self.paused += 1
            self.probing = True
        else:
            self.backoff = self.first_backoff
            self.probing = False
