"""ChunkedLoop: the decoding step with no host work inside, run ``steps`` at a time per host sync.

The engine's ordinary loop syncs once per step to apply stopping rules. Here one step is pure
device work over static shapes: propose (a graph-safe drafter such as prompt lookup), verify,
accept and commit, with each row's length kept on the device. ``steps`` such steps run back to
back (on CUDA, replayed as one captured CUDA graph per cache-view bucket); then the host reads
what was emitted and applies EOS, ``max_new_tokens`` and stop strings. A row that finishes
inside a chunk keeps decoding until the chunk ends; those extra tokens are cut on the host and
the row is frozen (it gains nothing) from the next chunk on. Rows never influence each other,
so what every row keeps is exactly what the per-step loop would have kept.

It knows the engine's buffers and the step; not tokenizers, nor how drafters work inside.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.drafters.base import DecodeContext
from specdec.verifiers.tree import DraftTree


@dataclass
class VerifyInputs:
    """What one verification forward reads: the root plus the tree's nodes, per row."""
    tokens: Tensor  # [B, N + 1] root token, then node tokens
    positions: Tensor  # [B, N + 1] root position, then root position + node depth
    slots: Tensor  # [B, N + 1] cache slots from the root's slot on
    among: Tensor  # [B, N + 1, N + 1] the root sees itself; nodes see the root and their ancestors
    depth: Tensor  # [B, N] node depth (1 = child of the root)
    root_slot: Tensor  # [B]


def verify_inputs(tree: DraftTree, tokens: Tensor, seq_len: Tensor, start: Tensor) -> VerifyInputs:
    """Lay out one step's verification: the root (last committed token) and the tree's nodes."""
    b, k, dev = tokens.shape[0], tree.num_nodes, tokens.device
    anc, depth = tree.compile()
    among = torch.ones(b, k + 1, k + 1, dtype=torch.bool, device=dev)
    among[:, 0, 1:] = False
    among[:, 1:, 1:] = anc
    root_slot = seq_len - 1
    slots = root_slot.unsqueeze(1) + torch.arange(k + 1, device=dev)
    offsets = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), depth], dim=1)
    positions = (root_slot - start).unsqueeze(1) + offsets
    step_tokens = torch.cat([tokens.gather(1, root_slot.unsqueeze(1)), tree.tokens], dim=1)
    return VerifyInputs(step_tokens, positions, slots, among, depth, root_slot)


def query_bucket(n: int) -> int:
    """The padded query length of a captured verification step: 1, then 8, 16, 32, 64, ...

    Example: ``[query_bucket(n) for n in (1, 2, 8, 9, 33)] == [1, 8, 8, 16, 64]``.
    """
    return 1 if n <= 1 else max(8, 1 << (n - 1).bit_length())


def check_compile(compile: bool | dict) -> bool | dict:
    """``wrap(compile=...)``: a bool (True: Inductor's defaults), or a dict of Inductor options
    (``torch._inductor.config`` names), which turns compiling on with exactly those. An unknown
    option fails here, at wrap time, not at the first captured chunk.

    ``{"coordinate_descent_tuning": True}`` (as gpt-fast sets it) is opt-in: on the H100 it took
    SmolLM2's compiled step from 1.32 to 1.12 ms, but on Qwen2.5-Coder-1.5B its tuning ran for
    minutes per view bucket (docs/RESULTS.md, "Issue 6 on the H100, session 5")."""
    if isinstance(compile, bool):
        return compile
    if not isinstance(compile, dict):
        raise TypeError(f"compile must be a bool or a dict of Inductor options, got {type(compile).__name__}")
    from torch._inductor import config as inductor

    known = set(inductor.get_config_copy())
    unknown = sorted(k for k in compile if k not in known)
    if unknown:
        raise ValueError(f"compile: unknown Inductor option(s) {unknown}; valid names are the attributes of "
                         "torch._inductor.config, e.g. 'coordinate_descent_tuning' or 'max_autotune'")
    return dict(compile)


def pad_queries(tokens: Tensor, positions: Tensor, slots: Tensor, among: Tensor, q: int):
    """Pad one step's ``[B, N]`` verification inputs to ``q`` queries. Padding queries take the
    next slots (so the slots stay contiguous), see only themselves and are seen by no real
    query: the real queries' outputs are unchanged, and the K/V the padding writes is scratch."""
    b, n = tokens.shape
    extra = q - n
    if extra <= 0:
        return tokens, positions, slots, among
    dev = tokens.device
    step = torch.arange(1, extra + 1, device=dev)
    wide = torch.zeros(b, q, q, dtype=torch.bool, device=dev)
    wide[:, :n, :n] = among
    wide[:, n:, n:] = torch.eye(extra, dtype=torch.bool, device=dev)
    return (torch.cat([tokens, tokens[:, -1:].expand(b, extra)], dim=1),
            torch.cat([positions, positions[:, -1:].expand(b, extra)], dim=1),
            torch.cat([slots, slots[:, -1:] + step], dim=1), wide)


def commit_step(tokens: Tensor, cache, seq_len: Tensor, root_slot: Tensor, emitted: Tensor, keep: Tensor,
                path: Tensor, accept_len: Tensor) -> None:
    """Write each row's first ``keep`` emitted tokens after its committed ones, move the accepted
    nodes' K/V next to the prefix, and advance ``seq_len`` (in place) by ``keep``."""
    ar = torch.arange(emitted.shape[1], device=tokens.device)
    write = seq_len.unsqueeze(1) + ar
    old = tokens.gather(1, write)
    tokens.scatter_(1, write, torch.where(ar < keep.unsqueeze(1), emitted, old))
    cache.lengths.copy_(seq_len)  # the root is now committed in the cache
    cache.commit(root_slot.unsqueeze(1) + 1 + path.clamp(min=0), accept_len)
    seq_len += keep
    cache.lengths.copy_(seq_len - 1)


@dataclass
class ChunkResult:
    gained: Tensor  # [S, B] tokens each row gained per step of the chunk
    proposed: Tensor  # [S, B] draft tokens each row was offered per step


class ChunkedLoop:
    """Persistent buffers for one (batch, capacity) plus the captured chunk graphs.

    Example (what ``SpecEngine.generate`` does with ``cuda_graphs=True``)::

        loop = ChunkedLoop(runner, cache, drafter, rule, steps=8, graphs=True)
        ctx = loop.load(tokens, seq_len, start, params)
        result = loop.run_chunk(ctx, upper_bound)   # 8 steps, no host sync inside
    """

    def __init__(self, runner, cache, drafter, rule, steps: int = 8, graphs: bool = True, bucket: int = 256,
                 compile: bool | dict = False):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        b, capacity = cache.batch, cache.max_len
        dev = runner.device
        self.runner, self.cache, self.drafter, self.rule = runner, cache, drafter, rule
        self.steps, self.graphs, self.bucket = steps, graphs, bucket
        self.k = drafter.num_nodes if drafter is not None else 0
        self.tokens = torch.zeros(b, capacity, dtype=torch.long, device=dev)
        self.seq_len = torch.zeros(b, dtype=torch.long, device=dev)
        self.start = torch.zeros(b, dtype=torch.long, device=dev)
        self.active = torch.ones(b, dtype=torch.long, device=dev)
        self.gained = torch.zeros(steps, b, dtype=torch.long, device=dev)
        self.proposed = torch.zeros(steps, b, dtype=torch.long, device=dev)
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (view, drafting) -> graph
        self.ctx: DecodeContext | None = None
        # torch.compile of the target's forward (dense-mask attention, which Inductor fuses);
        # the chunk graph then replays the compiled kernels. A dict (even {}) is Inductor options.
        self.compiled = compile is True or isinstance(compile, dict)
        if self.compiled:
            # Each view bucket (and each loop) is one more compiled variant; past dynamo's default
            # limit of 8 it would quietly fall back to eager.
            from torch import _dynamo

            dynamo = _dynamo.config
            dynamo.cache_size_limit = max(dynamo.cache_size_limit, 128)
            if hasattr(dynamo, "accumulated_cache_size_limit"):
                dynamo.accumulated_cache_size_limit = max(dynamo.accumulated_cache_size_limit, 1024)
            options = dict(compile) if isinstance(compile, dict) else None
            self.forward = torch.compile(self._forward, dynamic=False, options=options)
        else:
            self.forward = self._forward
        if self.compiled and hasattr(drafter, "compile_forwards"):  # the drafter compiles its step work too
            drafter.compile_forwards()
        self._propose = drafter.propose if drafter is not None else None
        if self.compiled and callable(getattr(drafter, "compiled_propose", None)):
            self._propose = drafter.compiled_propose()

    def _forward(self, tokens: Tensor, positions: Tensor, slots: Tensor, among: Tensor, view: int) -> Tensor:
        return self.runner.forward(self.cache, tokens, positions, slots, among, view_len=view,
                                   contiguous=not self.compiled).logits

    @property
    def growth(self) -> int:
        """The most slots a row can grow by in one chunk."""
        return self.steps * (self.k + 1)

    def load(self, tokens: Tensor, seq_len: Tensor, start: Tensor, params) -> DecodeContext:
        self.tokens[:, : tokens.shape[1]].copy_(tokens)  # a reused, larger buffer keeps its tail
        self.seq_len.copy_(seq_len)
        self.start.copy_(start)
        self.active.fill_(1)
        self.params = params
        self.ctx = DecodeContext(target=self.runner, tokens=self.tokens, seq_len=self.seq_len, start=self.start,
                                 params=params, max_seq_len=0, capacity=self.tokens.shape[1], cache=self.cache)
        return self.ctx

    def view_for(self, upper: int) -> int:
        """The cache view (a multiple of ``bucket``) that covers rows up to ``upper`` committed slots."""
        need = upper + self.growth + self.k + 1
        return min(-(-need // self.bucket) * self.bucket, self.tokens.shape[1])

    def run_chunk(self, upper: int, draft: bool = True) -> ChunkResult:
        """Decode ``steps`` steps; ``upper`` bounds every row's committed length (host side).
        ``draft=False`` verifies the root alone (the batch-size policy switched drafting off)."""
        view = self.view_for(upper)
        draft = draft and self.drafter is not None
        if not self.graphs:
            self._chunk(view, draft)
        else:
            if (view, draft) not in self._graphs:
                self._capture(view, draft)
            self._graphs[view, draft].replay()
        return ChunkResult(self.gained, self.proposed)

    def prepare(self, upper: int, draft: bool = True) -> int:
        """Capture now every chunk graph that rows up to ``upper`` committed slots can need, so
        that no capture (nor compile) lands inside a timed decode. Returns how many were new."""
        if not self.graphs:
            return 0
        draft = draft and self.drafter is not None
        first = self.view_for(int(self.seq_len.max()))
        views = range(first, self.view_for(upper) + 1, self.bucket)
        new = [v for v in views if (v, draft) not in self._graphs]
        for view in new:
            self._capture(view, draft)
        return len(new)

    def _state(self) -> list[Tensor]:
        return [self.tokens, self.seq_len, self.cache.lengths, self.gained, self.proposed]

    def _capture(self, view: int, draft: bool) -> None:
        # Warm up (Triton compiles, cuBLAS picks kernels) on real state, then put the state back:
        # a chunk moves tokens, lengths and K/V, and capture itself runs nothing.
        saved = [t.clone() for t in self._state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._chunk(view, draft)
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(self._state(), saved):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._chunk(view, draft)
        self._graphs[view, draft] = graph

    def _chunk(self, view: int, draft: bool) -> None:
        for i in range(self.steps):
            self._commit(i, *self._accept(*self._verify(view, self._draft(view, draft))))

    # One step, phase by phase: propose -> verify -> accept -> commit over static shapes, no host sync.
    def _draft(self, view: int, draft: bool) -> DraftTree:
        self.ctx.max_seq_len = view - self.k  # static: drafters slice the token buffer to this
        if draft:
            return self._propose(self.ctx)
        return DraftTree.empty(self.tokens.shape[0], self.tokens.device)

    def _verify(self, view: int, tree: DraftTree) -> tuple[DraftTree, VerifyInputs, Tensor]:
        v = verify_inputs(tree, self.tokens, self.seq_len, self.start)
        return tree, v, self.forward(v.tokens, v.positions, v.slots, v.among, view)

    def _accept(self, tree: DraftTree, v: VerifyInputs, logits: Tensor):
        outcome = self.rule.accept(logits, tree, self.params)
        emitted, count = outcome.emitted()
        return tree, v, outcome, emitted, count * self.active  # frozen rows gain nothing

    def _commit(self, i: int, tree: DraftTree, v: VerifyInputs, outcome, emitted: Tensor, count: Tensor) -> None:
        commit_step(self.tokens, self.cache, self.seq_len, v.root_slot, emitted, count, outcome.path,
                    outcome.accept_len * self.active)
        self.gained[i].copy_(count)
        if tree.num_nodes:
            self.proposed[i].copy_((v.depth * tree.valid).max(dim=1).values * self.active)
        else:
            self.proposed[i].zero_()

    def phase_times(self, upper: int, draft: bool = True, reps: int = 50) -> dict[str, float]:
        """Device milliseconds of one step's phases at the current state: draft, verify, accept and
        commit, each captured as its own CUDA graph and replayed ``reps`` times (CUDA only).

        The decode itself fuses them into one chunk graph; this splits the same work apart to say
        where a step's time goes. The state is put back afterwards.
        """
        if not self.tokens.is_cuda:
            raise ValueError("phase_times needs CUDA")
        view = self.view_for(upper)
        draft = draft and self.drafter is not None
        saved = [t.clone() for t in self._state()]
        box: dict = {}

        def restore():
            for t, s in zip(self._state()[1:3], saved[1:3]):
                t.copy_(s)
        phases = {
            "draft": lambda: box.__setitem__("tree", self._draft(view, draft)),
            "verify": lambda: box.__setitem__("v", self._verify(view, box["tree"])),
            "accept": lambda: box.__setitem__("a", self._accept(*box["v"])),
            "commit": lambda: (restore(), self._commit(0, *box["a"])),
            "restore": restore,  # replayed alone, then taken off the commit's time
        }
        graphs = {}
        for name, fn in phases.items():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graphs[name] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[name]):
                fn()
        ms = {}
        for name, graph in graphs.items():
            graph.replay()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(reps):
                graph.replay()
            end.record()
            end.synchronize()
            ms[name] = begin.elapsed_time(end) / reps
        ms["commit"] = max(0.0, ms["commit"] - ms.pop("restore"))
        for t, s in zip(self._state(), saved):
            t.copy_(s)
        torch.cuda.synchronize()
        return ms
