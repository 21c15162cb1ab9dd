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
                 compile: bool = False):
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
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.ctx: DecodeContext | None = None
        # torch.compile of the target's forward (dense-mask attention, which Inductor fuses);
        # the chunk graph then replays the compiled kernels.
        self.forward = torch.compile(self._forward, dynamic=False) if compile else self._forward
        self.compiled = compile

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

    def run_chunk(self, upper: int) -> ChunkResult:
        """Decode ``steps`` steps; ``upper`` bounds every row's committed length (host side)."""
        view = self.view_for(upper)
        if not self.graphs:
            self._chunk(view)
        else:
            if view not in self._graphs:
                self._capture(view)
            self._graphs[view].replay()
        return ChunkResult(self.gained, self.proposed)

    def _capture(self, view: int) -> None:
        # Warm up (Triton compiles, cuBLAS picks kernels) on real state, then put the state back:
        # a chunk moves tokens, lengths and K/V, and capture itself runs nothing.
        saved = [t.clone() for t in (self.tokens, self.seq_len, self.cache.lengths)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._chunk(view)
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip((self.tokens, self.seq_len, self.cache.lengths), saved):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._chunk(view)
        self._graphs[view] = graph

    def _chunk(self, view: int) -> None:
        for i in range(self.steps):
            self._step(view, i)

    def _step(self, view: int, i: int) -> None:
        """One propose -> verify -> accept -> commit over static shapes; no host sync."""
        ctx, dev, k = self.ctx, self.tokens.device, self.k
        b = self.tokens.shape[0]
        ctx.max_seq_len = view - k  # static: drafters slice the token buffer to this
        tree = self.drafter.propose(ctx) if self.drafter is not None else DraftTree.empty(b, dev)
        v = verify_inputs(tree, self.tokens, self.seq_len, self.start)
        logits = self.forward(v.tokens, v.positions, v.slots, v.among, view)
        outcome = self.rule.accept(logits, tree, self.params)
        emitted, count = outcome.emitted()
        count = count * self.active  # frozen rows gain nothing
        commit_step(self.tokens, self.cache, self.seq_len, v.root_slot, emitted, count, outcome.path,
                    outcome.accept_len * self.active)
        self.gained[i].copy_(count)
        self.proposed[i].copy_((v.depth * tree.valid).max(dim=1).values * self.active if k else count * 0)
