"""SpecEngine: the decoding loop. Prefill, then propose -> verify -> accept -> commit.

Layout: every prompt is left padded to a common length T, plus extra pad columns so that each
row has at least ``drafter.lookback`` slots (default 2; drafters may re-read that many). Row b's committed tokens are
``tokens[b, :seq_len[b]]`` and its *root*, the last committed token, is not in the KV cache yet:
each step feeds the root together with the draft nodes, so the root's logits judge the first
draft level and a step with no draft is plain autoregressive decoding. The no-drafter baseline
therefore runs through exactly this loop.

One host sync per step, at commit: the emitted tokens come to the host for stopping rules
(EOS, stop strings, ``max_new_tokens``), streaming and statistics.

The engine knows the runner, the cache, drafters and acceptance rules; not tokenizers or HF
generation options (``specdec.api`` translates those).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from specdec.drafters.base import DecodeContext, Drafter
from specdec.runner import ModelRunner
from specdec.static import ChunkedLoop, check_compile, commit_step, pad_queries, query_bucket, verify_inputs
from specdec.stats import PhaseTimer, SpecStats
from specdec.verifiers.acceptance import SamplingParams, make_acceptance
from specdec.verifiers.tree import DraftTree


@dataclass
class EngineOutput:
    generated: list[list[int]]  # [B][new tokens] per row, EOS included when hit
    stats: SpecStats


def left_pack(input_ids: Tensor, attention_mask: Tensor, width: int, pad: int) -> tuple[Tensor, Tensor]:
    """Right-align each row's real tokens in a ``[B, width]`` buffer. Returns (buffer, start).

    Works for left or right padded input: only positions where the mask is 1 are kept.
    """
    b, t = input_ids.shape
    real = attention_mask.bool()
    lengths = real.sum(dim=1)
    # Stable sort puts padding first and keeps real tokens in order.
    order = real.long().argsort(dim=1, stable=True)
    packed = input_ids.gather(1, order)
    buf = torch.full((b, width), pad, dtype=input_ids.dtype, device=input_ids.device)
    buf[:, width - t:] = packed
    start = width - lengths
    pos = torch.arange(width, device=input_ids.device).unsqueeze(0)
    buf = torch.where(pos >= start.unsqueeze(1), buf, torch.full_like(buf, pad))
    return buf, start


class GraphedVerifier:
    """The verification forward captured as CUDA graphs, one per (cache-view bucket, query bucket).

    A step's root-plus-nodes queries are padded to a query bucket (1, 8, 16, 32, 64, ...:
    ``query_bucket``), its inputs copied into that bucket's static buffers, and the graph for
    ``roundup(view_len, bucket)`` replayed; the first use of a pair captures it. So an undrafted
    step (1 query) and drafted steps of any size replay graphs too. Graphs belong to one
    KVCache, which the engine keeps across ``generate`` calls of the same batch size and capacity.

    ``logits=False`` runs the layers only (a prefill) and ``contiguous=False`` attends through the
    dense mask instead of the tree kernel; each combination is its own graph. ``graphs=False``
    runs the same padded forward without capturing anything (what the CPU tests check).
    """

    def __init__(self, runner: ModelRunner, cache, batch: int, bucket: int = 256, graphs: bool = True):
        self.runner, self.cache, self.bucket, self.batch, self.use_graphs = runner, cache, bucket, batch, graphs
        self.inputs: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # query bucket -> static inputs
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor | None]] = {}

    def fits(self, n: int) -> bool:
        """Whether ``n`` queries, padded to their bucket, fit in the cache from slot 0 on."""
        return query_bucket(n) <= self.cache.max_len

    def __call__(self, tokens: Tensor, positions: Tensor, slots: Tensor, among: Tensor, view_len: int,
                 logits: bool = True, contiguous: bool = True) -> Tensor | None:
        n = tokens.shape[1]
        q = query_bucket(n)
        padded = pad_queries(tokens, positions, slots, among, q)
        view = min(-(-(view_len + q - n) // self.bucket) * self.bucket, self.cache.max_len)
        if q not in self.inputs:
            self.inputs[q] = tuple(torch.zeros_like(t) for t in padded)
        for buf, t in zip(self.inputs[q], padded):
            buf.copy_(t)

        def step():
            return self.runner.forward(self.cache, *self.inputs[q], view_len=view, contiguous=contiguous,
                                       compute_logits=logits).logits
        key = (view, q, logits, contiguous)
        if not self.use_graphs:
            out = step()
        else:
            if key not in self.graphs:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):  # warm-up: same inputs, so the K/V it writes are the real ones
                        step()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = step()
                self.graphs[key] = (graph, out)
            graph, out = self.graphs[key]
            graph.replay()
        return out[:, :n] if logits else None


class DraftGate:
    """Whether the next step (or chunk) drafts: two policies, each off when its setting is None.

    - ``max_draft_batch``: with more active rows than this, steps verify the root only (like
      vLLM's ``disable_by_batch_size``: once the target's step is no longer launch-bound,
      drafting rarely pays).
    - ``min_tau``: drafting pays only while a drafted step keeps enough tokens. After each drafted
      window of ``window`` steps the gate compares the tokens kept per active row and step (τ)
      with ``min_tau``; below it, the next ``backoff`` steps run undrafted, then drafting is tried
      again. The backoff doubles on every failed try (up to ``max_backoff``) and falls back to its
      first value when a window pays. Pick ``min_tau`` from the step costs: on the H100 a lookup
      step of γ = 8 costs 1.25× (Qwen 1.5B) to 1.46× (SmolLM2) a plain one's device time, so
      drafting below that τ loses time. Bursty drafters (lookup) can lose more to a pause that
      misses the next burst than they save.

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

    def decide(self, drafter, ctx: DecodeContext, active: list[bool], seq_host: list[int]) -> bool:
        """Whether the next step (or chunk) drafts. When drafting resumes after undrafted steps, a
        drafter with state of its own (a draft model's KV cache) first catches up, through its
        ``resync(ctx, since)``, on the tokens committed since the pause began; stateless drafters,
        and those that read new tokens from the buffer anyway (lookup, CopySpec), need nothing."""
        if drafter is None:
            return False
        draft = self.want(sum(active))
        if draft and self.paused_at is not None:
            if hasattr(drafter, "resync"):
                drafter.resync(ctx, self.paused_at)
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


class SpecEngine:
    """Speculative decoding over one target model.

    Example::

        engine = SpecEngine(model, drafter=PromptLookup(num_tokens=4))
        out = engine.generate(input_ids, attention_mask, max_new_tokens=64,
                              params=SamplingParams(), eos_ids={2}, pad_id=0)
    """

    def __init__(self, model, drafter: Drafter | None = None, acceptance: str | None = None, attention: str = "auto",
                 max_draft_batch: int | None = None, cuda_graphs: bool = False, chunk_steps: int | None = None,
                 compile: bool | dict = False, fuse: bool | None = None, min_tau: float | None = None,
                 pipeline: bool | None = None, bucket_prefill: bool | None = None):
        # Fused q/k/v and gate/up projections (specdec.fused); None: wherever the layers allow.
        self.runner = ModelRunner(model, attention=attention, fuse=fuse)
        if cuda_graphs and self.runner.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        if chunk_steps is not None and chunk_steps < 1:
            raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
        # Capture the verification step as CUDA graphs (one per 256-slot view bucket); greedy
        # decoding with no drafter or a graph-safe one captures whole chunks of steps instead.
        self.cuda_graphs = cuda_graphs
        # Steps per host sync for greedy decoding with no drafter or a graph-safe one
        # (``specdec.static``); default 8 with cuda_graphs, else 1 (the per-step loop).
        self.chunk_steps = chunk_steps if chunk_steps is not None else (8 if cuda_graphs else 1)
        # torch.compile the target forward inside captured chunks; a dict also names Inductor
        # options for it (e.g. {"coordinate_descent_tuning": True}), checked here.
        self.compile = check_compile(compile)
        # Chunked decoding launches the next chunk before reading the last one back, so the host's
        # bookkeeping (and the graph launch) overlaps the device's work instead of idling it.
        # Default: on with cuda_graphs. Costs one wasted chunk when a batch ends at EOS.
        self.pipeline = cuda_graphs if pipeline is None else pipeline
        # Pad the prefill to a query bucket (GraphedVerifier) and, with cuda_graphs, replay it as a
        # captured graph per bucket: the eager prefill is launch-bound (20-35 ms for SmolLM2 on the
        # H100 whatever the prompt's length; about 1 ms replayed). Default: on with cuda_graphs.
        self.bucket_prefill = cuda_graphs if bucket_prefill is None else bucket_prefill
        self._cache = None
        self._verifier = None
        self._loop: ChunkedLoop | None = None
        self._reserved: tuple[int, int] | None = None  # (batch, capacity) set by reserve()
        self.drafter = drafter
        # Like vLLM's disable_by_batch_size: with more active rows than this, a step verifies the
        # root only (drafting rarely pays once the target's step is no longer launch-bound).
        self.max_draft_batch = max_draft_batch
        # Drafting pauses (with a growing backoff) while drafted steps keep fewer than min_tau
        # tokens per row: see DraftGate. Checked here so a bad value fails at wrap time.
        self.min_tau = min_tau
        DraftGate(max_draft_batch, min_tau)
        self.acceptance_name = acceptance
        if drafter is not None:
            for member in ("num_nodes", "begin", "propose", "observe"):
                if not hasattr(drafter, member):
                    raise TypeError(f"{type(drafter).__name__} is not a Drafter: it has no {member!r}")
            if hasattr(drafter, "check_target"):
                drafter.check_target(self.runner)

    def reserve(self, batch: int, max_length: int) -> None:
        """Size the cache of ``batch``-row calls for ``max_length`` tokens (prompt plus new ones)
        and, with cuda_graphs, capture every chunk graph up to it on the next call: later calls up
        to that length then reuse the cache and never capture (or compile) while decoding.
        Benchmarks call this before timing."""
        capacity = self._capacity(max_length + self._pad(), chunked=True)
        if self.bucket_prefill:
            capacity = max(capacity, query_bucket(max_length + self._pad()))
        self._reserved = (batch, -(-capacity // 512) * 512 if self.cuda_graphs else capacity)

    def _pad(self) -> int:
        """Extra left padding so every row has the drafter's ``lookback`` committed slots."""
        return max(1, getattr(self.drafter, "lookback", 2) - 1)

    def _capacity(self, committed: int, chunked: bool) -> int:
        """Cache slots for rows of up to ``committed`` tokens: plus the draft nodes (or the drafter's
        scratch), the root's slot, and in chunks the most a finished row may run on."""
        n_nodes = getattr(self.drafter, "num_nodes", 0)
        queries = query_bucket(n_nodes + 1) if self.cuda_graphs else n_nodes + 1  # graphs pad the queries
        capacity = committed + max(queries - 1, getattr(self.drafter, "scratch_slots", 0)) + 1
        # A row that stops inside a chunk runs on to its end; pipelined, through one more chunk.
        chunks = (2 if self.pipeline else 1) if chunked else 0
        return capacity + chunks * self.chunk_steps * (n_nodes + 1)

    def step_profile(self, reps: int = 50) -> dict[str, float] | None:
        """Device milliseconds per step, by phase (draft, verify, accept, commit), of the captured
        chunked loop at the state the last greedy call left it in; None when no such loop ran."""
        loop = self._loop
        if loop is None or not loop.graphs or loop.ctx is None:
            return None
        upper = int(loop.seq_len.max())
        return loop.phase_times(min(upper, loop.tokens.shape[1] - loop.growth - loop.k - 1), reps=reps)

    def _rule(self, params: SamplingParams):
        name = self.acceptance_name or ("speculative" if params.do_sample else "greedy")
        if name == "greedy" and params.do_sample:
            raise ValueError("acceptance='greedy' needs do_sample=False; sampling uses acceptance='speculative'")
        return make_acceptance(name)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, params: SamplingParams,
                 eos_ids: set[int], pad_id: int, stop_fn: Callable[[int, list[int]], bool] | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None) -> EngineOutput:
        """Decode up to ``max_new_tokens`` per row. ``stop_fn(row, row_tokens)`` may end a row early
        (row_tokens are the real prompt tokens plus everything generated); ``on_tokens(row, new)``
        sees each step's kept tokens (streaming)."""
        runner, drafter, rule = self.runner, self.drafter, self._rule(params)
        dev = runner.device
        chunked = (self.chunk_steps > 1 and not params.do_sample
                   and (drafter is None or getattr(drafter, "graph_safe", False)))
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        b = input_ids.shape[0]
        n_nodes = drafter.num_nodes if drafter is not None else 0
        width = int(attention_mask.sum(dim=1).max()) + self._pad()
        capacity = self._capacity(width + max_new_tokens, chunked)
        if self.bucket_prefill:   # room for the padded prefill's scratch slots
            capacity = max(capacity, query_bucket(width - 1))
        if self._reserved is not None and self._reserved[0] == b:
            capacity = max(capacity, self._reserved[1])
        if self.cuda_graphs:  # round up so that later calls can reuse the cache and its graphs
            capacity = -(-capacity // 512) * 512
        wall0 = time.perf_counter()

        tokens = torch.full((b, capacity), pad_id, dtype=torch.long, device=dev)
        tokens[:, :width], start = left_pack(input_ids.long(), attention_mask, width, pad_id)
        seq_len = torch.full((b,), width, dtype=torch.long, device=dev)
        if self.cuda_graphs and self._cache is not None and self._cache.batch == b and self._cache.max_len >= capacity:
            cache = self._cache
            cache.lengths.zero_()
            capacity = cache.max_len
        else:
            cache = runner.new_cache(b, capacity)
            self._loop = None
            if self.cuda_graphs:
                self._cache = cache
                self._verifier = GraphedVerifier(runner, cache, b)
        cache.start.copy_(start)
        # Prefill: every committed token but the root.
        n = width - 1
        slots = torch.arange(n, device=dev).expand(b, n)
        causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril().expand(b, n, n)
        positions = (slots - start[:, None]).clamp(min=0)
        # Without cuda_graphs a bucketed prefill is the same padded forward, captured nowhere.
        padded = (self._verifier or GraphedVerifier(runner, cache, b, graphs=False)) if self.bucket_prefill else None
        if padded is not None and padded.fits(n):
            padded(tokens[:, :n], positions, slots, causal, view_len=n, logits=False, contiguous=False)
        else:
            runner.forward(cache, tokens[:, :n], positions, slots, causal, view_len=n, compute_logits=False)
        cache.lengths.copy_(seq_len - 1)
        prefill_time = time.perf_counter() - wall0

        prompts = [row[s:] for row, s in zip(tokens[:, :width].tolist(), start.tolist())]
        generated: list[list[int]] = [[] for _ in range(b)]
        gained: list[list[int]] = [[] for _ in range(b)]
        offered: list[list[int]] = [[] for _ in range(b)]
        active = [True] * b
        seq_host = [width] * b
        timer = PhaseTimer(dev)
        steps = drafts = undrafted = 0
        chunk_forwards = None
        gate = DraftGate(self.max_draft_batch, self.min_tau, window=max(8, self.chunk_steps if chunked else 1))
        undrafted_by_row = [0] * b
        if chunked:
            if self._loop is None or self._loop.cache is not cache or self._loop.drafter is not drafter:
                self._loop = ChunkedLoop(runner, cache, drafter, rule, steps=self.chunk_steps,
                                         graphs=self.cuda_graphs, compile=self.compile)
            ctx = self._loop.load(tokens, seq_len, start, params)
            ctx.max_seq_len = width
            if drafter is not None:
                drafter.begin(ctx)
            if self._reserved is not None and self._reserved[0] == b:  # capture every view bucket up front
                upper = capacity - self._loop.growth - n_nodes - 1
                self._loop.prepare(upper, draft=True)
                if drafter is not None and ((self.max_draft_batch is not None and self.max_draft_batch < b)
                                            or self.min_tau is not None):
                    self._loop.prepare(upper, draft=False)
            steps, drafts, undrafted = self._run_chunks(
                self._loop, width, max_new_tokens, eos_ids, stop_fn, on_tokens, prompts, generated, gained, offered,
                active, timer, gate, undrafted_by_row, self.pipeline)
            if drafter is None:
                drafts = undrafted = 0
            elif self.cuda_graphs:  # replayed graphs run no Python: count the drafter's forwards here
                chunk_forwards = drafts * getattr(drafter, "forwards_per_step", 1)
        ctx = DecodeContext(target=runner, tokens=tokens, seq_len=seq_len, start=start, params=params,
                            max_seq_len=width, capacity=capacity, cache=cache)
        if drafter is not None and not chunked:
            drafter.begin(ctx)
        while any(active):
            timer.start()
            draft_now = gate.decide(drafter, ctx, active, seq_host)
            tree = drafter.propose(ctx) if draft_now else DraftTree.empty(b, dev)
            drafts += int(draft_now)
            undrafted += int(drafter is not None and not draft_now)
            timer.lap("draft")

            # Verify: one target forward over [root, nodes]; nodes see the root and their ancestors.
            k = tree.num_nodes
            v = verify_inputs(tree, tokens, seq_len, start)
            # Drafters may ask for the target's hidden states after some layer counts (DEL's shadows).
            exits = getattr(drafter, "collect_hidden", None) if draft_now else None
            layer_hidden = None
            if self._verifier is not None and not exits:
                logits = self._verifier(v.tokens, v.positions, v.slots, v.among, ctx.max_seq_len + k)
            else:
                out = runner.forward(cache, v.tokens, v.positions, v.slots, v.among, view_len=ctx.max_seq_len + k,
                                     contiguous=True, collect=exits)
                logits, layer_hidden = out.logits, out.layer_hidden
            timer.lap("verify")

            outcome = rule.accept(logits, tree, params)
            outcome.layer_hidden = layer_hidden
            emitted, count = outcome.emitted()  # [B, k + 1], [B]
            proposed = (v.depth * tree.valid).max(dim=1).values if k else torch.zeros_like(count)
            timer.lap("accept")

            # Host bookkeeping: the step's single sync.
            host = torch.cat([emitted, count.unsqueeze(1), proposed.unsqueeze(1)], dim=1).tolist()
            keep = [0] * b
            for r in range(b):
                if not active[r]:
                    continue
                *em, cnt, prop = host[r]
                for tok in em[:cnt]:
                    generated[r].append(tok)
                    keep[r] += 1
                    if (tok in eos_ids or len(generated[r]) >= max_new_tokens
                            or (stop_fn is not None and stop_fn(r, prompts[r] + generated[r]))):
                        active[r] = False
                        break
                gained[r].append(keep[r])
                offered[r].append(prop)
                if on_tokens is not None:
                    on_tokens(r, generated[r][-keep[r]:])
            outcome.accepted_host = [host[r][k + 1] - 1 for r in range(b) if keep[r]]
            gate.record(draft_now, 1, sum(keep), sum(1 for r in range(b) if keep[r]))
            if drafter is not None and not draft_now:
                for r in range(b):
                    undrafted_by_row[r] += int(keep[r] > 0)
            timer.start()

            # Commit: kept tokens into the buffer, accepted nodes' K/V next to the prefix.
            commit_step(tokens, cache, seq_len, v.root_slot, emitted, torch.tensor(keep, device=dev), outcome.path,
                        outcome.accept_len)
            seq_host = [s + kk for s, kk in zip(seq_host, keep)]
            ctx.max_seq_len = max(seq_host)
            steps += 1
            ctx.step = steps
            if draft_now:
                drafter.observe(outcome)
            timer.lap("commit")

        wall = time.perf_counter() - wall0
        stats = SpecStats(accepted_lengths=gained, proposed=offered, new_tokens=[len(g) for g in generated],
                          num_steps=steps, draft_forwards=(chunk_forwards if chunk_forwards is not None
                                                           else getattr(drafter, "forwards", drafts)),
                          verify_forwards=steps, times=timer.result(wall - prefill_time), wall_time=wall,
                          lossless=rule.lossless, acceptance=rule.name,
                          drafter=type(drafter).__name__ if drafter is not None else "none",
                          prefill_time=prefill_time, undrafted_steps=undrafted,
                          draft_pauses=gate.paused if drafter is not None else 0,
                          undrafted_by_row=undrafted_by_row if drafter is not None else [0] * b)
        return EngineOutput(generated=generated, stats=stats)

    @staticmethod
    def _run_chunks(loop: ChunkedLoop, width, max_new_tokens, eos_ids, stop_fn, on_tokens, prompts, generated,
                    gained, offered, active, timer, gate: DraftGate, undrafted_by_row: list[int],
                    pipeline: bool = False) -> tuple[int, int, int]:
        """Decode with ``loop`` until every row stops; the host reads once per chunk, and ``gate``
        decides per chunk whether it drafts. Returns (steps, drafted steps, undrafted steps).

        With ``pipeline`` the next chunk is queued before the host reads the current one back (over
        pinned memory, waiting on an event, not on the stream), so the device never idles on the
        host. A row that stops in the chunk being read has already run through the queued one too;
        its extra tokens are cut like any others and it is frozen from the chunk after. The queued
        chunk always drafts as the one before it did: a change of the gate's decision (which may
        need a drafter's ``resync``) waits until the host has read everything back. No chunk is
        queued once every live row is sure to reach ``max_new_tokens`` in the one running."""
        b, dev = len(active), loop.tokens.device
        grow = torch.arange(loop.growth, device=dev)
        seq_host, steps, drafted, s = [width] * b, 0, 0, loop.steps
        queued: list[tuple[bool, Tensor, torch.cuda.Event | None]] = []   # (drafts, host copy, copy done)

        def launch(draft: bool, upper: int) -> None:
            timer.start()
            before = loop.seq_len.clone()
            result = loop.run_chunk(upper, draft=draft or loop.drafter is None)
            timer.lap("verify")  # propose, verify, accept and commit all run inside the chunk
            new = loop.tokens.gather(1, (before.unsqueeze(1) + grow).clamp(max=loop.tokens.shape[1] - 1))
            packed = torch.cat([result.gained.T, result.proposed.T, new], dim=1)
            done = None
            if packed.is_cuda:   # copy back without waiting on the stream (a queued chunk may follow)
                host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                host.copy_(packed, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                packed = host
            queued.append((draft, packed, done))

        while any(active):
            if not queued:
                loop.ctx.max_seq_len = max(seq_host)   # what a resync reads up to; chunks set their own
                launch(gate.decide(loop.drafter, loop.ctx, active, seq_host), max(seq_host))
            if (pipeline and len(queued) == 1
                    and any(a and len(g) + s < max_new_tokens for a, g in zip(active, generated))
                    and (loop.drafter is None or gate.want(sum(active)) == queued[0][0])):
                launch(queued[0][0], max(seq_host) + loop.growth)   # rows may grow by a chunk meanwhile
            draft, packed, done = queued.pop(0)
            if done is not None:
                done.synchronize()
            host = packed.tolist()
            steps += s
            drafted += s if draft else 0
            stopped = False
            kept = row_steps = 0
            for r in range(b):
                if not active[r]:
                    continue
                row_gain, row_prop, row_new = host[r][:s], host[r][s: 2 * s], host[r][2 * s:]
                seq_host[r] += sum(row_gain)
                pos = 0
                for cnt, prop in zip(row_gain, row_prop):
                    keep = 0
                    for tok in row_new[pos: pos + cnt]:
                        generated[r].append(tok)
                        keep += 1
                        if (tok in eos_ids or len(generated[r]) >= max_new_tokens
                                or (stop_fn is not None and stop_fn(r, prompts[r] + generated[r]))):
                            active[r] = False
                            break
                    pos += cnt
                    kept += keep
                    row_steps += 1
                    undrafted_by_row[r] += int(loop.drafter is not None and not draft)
                    gained[r].append(keep)
                    offered[r].append(prop)
                    if on_tokens is not None and keep:
                        on_tokens(r, generated[r][-keep:])
                    if not active[r]:
                        stopped = True
                        break
            gate.record(draft, s, kept, row_steps)
            if stopped:   # frozen from the next chunk launched; pinned, so the copy does not drain the queue
                flags = torch.tensor(active, dtype=torch.long, pin_memory=loop.tokens.is_cuda)
                loop.active.copy_(flags, non_blocking=True)
        return steps, drafted, steps - drafted
