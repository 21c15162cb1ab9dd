"""The decoding step and the Decoder that runs ``n`` of them per host sync.

One step is pure device work over static shapes: propose (the drafter) -> verify (one target
forward over each row's root and draft nodes) -> accept (the rule) -> commit (kept tokens into
the buffer, accepted K/V next to the prefix) -> observe (the drafter adapts). No ``.item()``,
no branch on a device value. ``Decoder.run(n)`` runs ``n`` steps back to back: on CUDA with
graphs on, replayed as one captured CUDA graph; otherwise eagerly, which with ``n = 1`` is the
plain per-step loop. A row that finishes inside a run keeps stepping until the run ends; the
host cuts those tokens and freezes the row (``state.active``). Rows never influence each other,
so what each row keeps does not depend on ``n``.

Compile once: with graphs or ``compile`` on, every step attends over the whole cache (a fixed
view) and the prefill runs in fixed chunks of ``PREFILL_CHUNK`` tokens, so the captured graphs
and compiled kernels depend on the batch size and the cache's capacity only, never on a
prompt's length.

It knows the state, the step and the drafter contract; not tokenizers, stopping rules or stats.
"""
from __future__ import annotations

import functools
import gc
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.state import DecodeState
from specdec.validate import step_faults
from specdec.verifiers.processors import process_logits
from specdec.verifiers.tree import DraftTree

PREFILL_CHUNK = 128  # queries per captured prefill graph


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
    k, dev = tree.num_nodes, tokens.device
    among, offsets = tree.rooted()  # device constants for a tree of fixed shape
    root_slot = seq_len - 1
    slots = root_slot.unsqueeze(1) + torch.arange(k + 1, device=dev)
    positions = (root_slot - start).unsqueeze(1) + offsets
    step_tokens = torch.cat([tokens.gather(1, root_slot.unsqueeze(1)), tree.tokens], dim=1)
    return VerifyInputs(step_tokens, positions, slots, among, tree.depth, root_slot)


def commit_step(state: DecodeState, root_slot: Tensor, emitted: Tensor, keep: Tensor, path: Tensor,
                accept_len: Tensor, moves: bool = True) -> None:
    """Write each row's first ``keep`` emitted tokens after its committed ones, move the accepted
    nodes' K/V next to the prefix, and advance ``seq_len`` (in place) by ``keep``.

    All ``N + 1`` emitted columns are written: those past ``keep`` land beyond ``seq_len``, where
    the buffer is scratch (``DecodeState``), and the next steps overwrite them. ``moves=False``
    when the accepted nodes already sit right after the prefix (a chain's accepted prefix was
    verified in exactly those slots), so only the lengths advance."""
    tokens, cache, seq_len = state.tokens, state.cache, state.seq_len
    tokens.scatter_(1, seq_len.unsqueeze(1) + torch.arange(emitted.shape[1], device=tokens.device), emitted)
    if moves:
        cache.lengths.copy_(seq_len)  # the root is now committed in the cache
        cache.commit(root_slot.unsqueeze(1) + 1 + path.clamp(min=0), accept_len)
    seq_len += keep
    cache.lengths.copy_(seq_len - 1)


def check_compile(compile: bool | dict) -> bool | dict:
    """``wrap(compile=...)``: a bool (True: Inductor's defaults), or a dict of Inductor options
    (``torch._inductor.config`` names), which turns compiling on with exactly those. An unknown
    option fails here, at wrap time, not at the first step."""
    if isinstance(compile, bool):
        return compile
    if not isinstance(compile, dict):
        raise TypeError(f"compile must be a bool or a dict of Inductor options, got {type(compile).__name__}")
    from torch._inductor import config as inductor

    unknown = sorted(k for k in compile if k not in set(inductor.get_config_copy()))
    if unknown:
        raise ValueError(f"compile: unknown Inductor option(s) {unknown}; valid names are the attributes of "
                         "torch._inductor.config, e.g. 'coordinate_descent_tuning' or 'max_autotune'")
    return dict(compile)


def compiled(fn, compile: bool | dict):
    """``fn`` under ``torch.compile`` with static shapes (and the given Inductor options)."""
    from torch import _dynamo

    dynamo = _dynamo.config  # every graph variant is one more entry: keep dynamo from giving up on them
    dynamo.cache_size_limit = max(dynamo.cache_size_limit, 64)
    options = dict(compile) if isinstance(compile, dict) else None
    return torch.compile(fn, dynamic=False, options=options)


def target_forward(runner, cache, hidden_layers: tuple, tokens, positions, slots, among, view: int,
                   logits: bool = True, contiguous: bool = True, collect: bool = False):
    """The target's forward of a step or a prefill chunk: ``(logits, hidden of hidden_layers)``; a
    prefill chunk (``logits=False``) collects them only when asked (``collect``)."""
    out = runner.forward(cache, tokens, positions, slots, among, view_len=view, contiguous=contiguous,
                         compute_logits=logits, collect=hidden_layers if logits or collect else None)
    return out.logits, out.layer_hidden


class Decoder:
    """The state of one (batch, capacity) plus its captured graphs; drafter and rule are fixed.

    Example (what ``SpecEngine.generate`` does)::

        dec = Decoder(runner, drafter, rule, batch=2, capacity=512, steps=8, graphs=True)
        dec.load(tokens, start, width, params)      # prefill
        gained, proposed = dec.run(draft=True)       # 8 steps, no host sync inside
    """

    def __init__(self, runner, drafter, rule, batch: int, capacity: int, steps: int, graphs: bool,
                 compile: bool | dict = False, static: bool | None = None, bucket: int = 256):
        dev = runner.device
        self.runner, self.drafter, self.rule, self.spec = runner, drafter, rule, drafter.spec
        self.steps, self.graphs, self.bucket = steps, graphs, bucket
        self.k = self.spec.num_nodes
        self.reach = max(self.k, self.spec.scratch_slots)  # slots past the root a step may write
        # One cache view for every call, and the prefill in fixed chunks: nothing recompiles.
        self.static = graphs or bool(compile) if static is None else static
        cache = runner.new_cache(batch, capacity)
        long = dict(dtype=torch.long, device=dev)
        self.state = DecodeState(target=runner, cache=cache, tokens=torch.zeros(batch, capacity, **long),
                                 seq_len=torch.zeros(batch, **long), start=torch.zeros(batch, **long),
                                 active=torch.ones(batch, **long), params=None, max_seq_len=0, capacity=capacity,
                                 prompt_end=torch.zeros(batch, **long))
        self.gained = torch.zeros(steps, batch, **long)  # [S, B] tokens each row kept per step
        self.proposed = torch.zeros(steps, batch, **long)  # [S, B] draft depth each row was offered
        self.faults = torch.zeros(steps, batch, **long)  # [S, B] validate.step_faults of each row per step
        self.prefill_in = None  # static prefill inputs (tokens, positions, slots, among, offset)
        # The drafter reads the prompt's hidden states from the prefill itself (observe_prefill).
        self.prefill_states = self.spec.prefill_hidden and bool(self.spec.hidden_layers)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}  # (kind, view, drafting) -> graph
        self.compiled = bool(compile)
        self.contiguous = True  # verification attends through the tree kernel; False: the dense mask
        # Bound to the runner and cache, not to self: a Decoder holds no reference cycle, so its
        # buffers are freed the moment its engine drops it, not whenever the cyclic GC runs.
        target = functools.partial(target_forward, runner, cache, self.spec.hidden_layers)
        self._forward = compiled(target, compile) if compile else target
        if compile:
            drafter.compile(compile if isinstance(compile, dict) else None)

    @property
    def growth(self) -> int:
        """The most slots a row can grow by in one run."""
        return self.steps * (self.k + 1)

    def view_for(self, upper: int) -> int:
        """Cache slots the steps of a run attend over, for rows of up to ``upper`` committed slots."""
        capacity = self.state.capacity
        if self.static:
            return capacity
        need = upper + self.growth + self.reach + 1
        return min(-(-need // self.bucket) * self.bucket, capacity)

    # ------------------------------------------------------------------ prefill
    def load(self, tokens: Tensor, start: Tensor, width: int, params) -> None:
        """Take ``[B, width]`` left-packed prompts and prefill the cache with all but each row's root."""
        s = self.state
        s.tokens[:, :width].copy_(tokens)
        s.seq_len.fill_(width)
        s.prompt_end.fill_(width)
        s.start.copy_(start)
        s.cache.start.copy_(start)
        s.active.fill_(1)
        s.params, s.hidden = params, None
        n = width - 1
        s.prompt_states = self.prefill_states and n > 0
        if s.prompt_states:
            self.drafter.reserve(s)
        chunk = PREFILL_CHUNK if self.static else max(n, 1)
        for offset in range(0, n, chunk):
            self._prefill_chunk(offset, min(chunk, n - offset), chunk)
        if not self.static:  # sized by this prompt (a width x width mask): free it for the drafter's prefill
            self.prefill_in = None
        s.cache.lengths.copy_(s.seq_len - 1)
        s.max_seq_len = width

    def _prefill_chunk(self, offset: int, n: int, chunk: int) -> None:
        """Feed slots ``offset .. offset + n - 1``; the chunk is padded to ``chunk`` queries, which
        write scratch slots after it that nothing reads before the steps overwrite them."""
        s, dev = self.state, self.state.tokens.device
        b = s.tokens.shape[0]
        slots = (offset + torch.arange(chunk, device=dev)).expand(b, chunk)
        if self.prefill_in is None or self.prefill_in[0].shape[1] != chunk:
            causal = torch.ones(chunk, chunk, dtype=torch.bool, device=dev).tril().expand(b, chunk, chunk)
            self.prefill_in = (torch.zeros_like(slots), torch.zeros_like(slots), torch.zeros_like(slots), causal)
        toks, pos, slot_in, _ = self.prefill_in
        real = s.tokens[:, offset: offset + n]
        toks.copy_(torch.cat([real, real[:, -1:].expand(b, chunk - n)], dim=1))
        pos.copy_((slots - s.start[:, None]).clamp(min=0))
        slot_in.copy_(slots)
        s.cache.lengths.fill_(offset)
        self._replay(("prefill", self.state.capacity if self.static else offset + chunk, False))

    # ------------------------------------------------------------------ steps
    def run(self, draft: bool) -> tuple[Tensor, Tensor]:
        """``steps`` steps; ``draft=False`` verifies each root alone (a draft policy paused
        drafting). Returns the ``[S, B]`` gained and proposed buffers (valid until the next run)."""
        self._replay(self._key(self.view_for(self.state.max_seq_len), draft))
        return self.gained, self.proposed

    def _key(self, view: int, draft: bool) -> tuple:
        """A step graph's key. The rule, the sampling settings and the logits processors are baked
        into its kernels."""
        params = self.state.params
        return ("steps", view, draft, self.rule.name, params if params.do_sample else params.processors)

    def _replay(self, key: tuple) -> None:
        if not self.graphs:
            self._body(*key)
            return
        if key not in self._graphs:
            self._capture(key)
        self._graphs[key].replay()

    def _body(self, kind: str, view: int, draft: bool, *variant) -> None:
        if kind == "prefill":
            _, hidden = self._forward(*self.prefill_in, view, logits=False, contiguous=False,
                                      collect=self.prefill_states)
            if self.prefill_states:
                self.drafter.observe_prefill(self.state, self.prefill_in[2], hidden)
            return
        self.faults.zero_()  # a step whose checks cannot fail leaves its row of marks as it is
        for i in range(self.steps):
            self.step(i, view, draft)

    def step(self, i: int, view: int, draft: bool) -> None:
        """One step: propose -> verify -> accept -> commit (the drafter observes at commit), then
        mark what the host must refuse (a malformed tree, a distribution that is not one)."""
        tree, v, logits, hidden = self._verify(view, self._propose(view, draft))
        accepted = self._accept(tree, v, logits, hidden)  # (tree, v, outcome, emitted, count, hidden)
        self._commit(i, draft, *accepted)
        params, path = self.state.params, accepted[2].path
        if params.do_sample or not tree.known_forest:  # else nothing to check: greedy, and a forest by construction
            self.faults[i].copy_(step_faults(tree, logits, path, params.do_sample, params.temperature) * self.state.active)

    # One step, phase by phase (``phase_times`` times each one on its own).
    def _propose(self, view: int, draft: bool) -> DraftTree:
        s = self.state
        s.max_seq_len = view - self.reach - 1  # static: drafters slice the buffer to this
        if draft and self.k:
            return self.drafter.propose(s)
        return DraftTree.empty(s.tokens.shape[0], s.tokens.device)

    def _verify(self, view: int, tree: DraftTree):
        s = self.state
        v = verify_inputs(tree, s.tokens, s.seq_len, s.start)
        # On CUDA full-attention layers use the tree-attention kernel (an opaque operator under
        # compile), which reads each row's length: the whole-cache view costs nothing extra.
        logits, hidden = self._forward(v.tokens, v.positions, v.slots, v.among, view, contiguous=self.contiguous)
        return tree, v, logits, hidden

    def _accept(self, tree: DraftTree, v: VerifyInputs, logits: Tensor, hidden: Tensor | None):
        s = self.state
        logits = process_logits(logits, s.params.processors, tree, s.tokens, s.seq_len, s.start, s.prompt_end)
        outcome = self.rule.accept(logits, tree, s.params)
        emitted, count = outcome.emitted()
        return tree, v, outcome, emitted, count * s.active, hidden  # frozen rows gain nothing

    def _commit(self, i: int, draft: bool, tree: DraftTree, v: VerifyInputs, outcome, emitted: Tensor,
                count: Tensor, hidden: Tensor | None) -> None:
        s = self.state
        commit_step(s, v.root_slot, emitted, count, outcome.path, outcome.accept_len * s.active, moves=not tree.is_chain)
        self.gained[i].copy_(count)
        if tree.num_nodes:
            self.proposed[i].copy_(tree.max_depth() * s.active)
        else:
            self.proposed[i].zero_()
        if draft and self.k:
            s.hidden = hidden
            self.drafter.observe(s, outcome)

    # ------------------------------------------------------------------ capture
    def _saved(self) -> list[Tensor]:
        s = self.state
        return [s.tokens, s.seq_len, s.cache.lengths, self.gained, self.proposed, self.faults]

    def _capture(self, key: tuple) -> None:
        """Warm up (Triton compiles, cuBLAS and Inductor pick kernels) on the real state, put the
        state back, then capture: capturing runs nothing. A drafter's own state moved by the
        warm-up is reset by ``begin`` (captures happen right after a prefill)."""
        saved = [t.clone() for t in self._saved()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body(*key)
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(self._saved(), saved):
            t.copy_(s)
        self._graphs[key] = capture(lambda: self._body(*key))

    def prepare(self, variants: tuple[bool, ...]) -> int:
        """Capture now the step graphs for each drafting choice in ``variants`` (right after a
        prefill, before ``drafter.begin``), so no capture lands mid-decode. Returns how many were new."""
        if not self.graphs:
            return 0
        keys = [self._key(self.view_for(self.state.max_seq_len), d) for d in variants]
        new = [k for k in keys if k not in self._graphs]
        for key in new:
            self._capture(key)
        return len(new)

    def release(self) -> None:
        """Free the captured graphs (a Decoder that is being replaced)."""
        self._graphs.clear()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    @torch.no_grad()  # as decoding: with autograd on, drafters' compiled forwards recompiled inside the capture
    def phase_times(self, draft: bool = True, reps: int = 50) -> dict[str, float]:
        """Device milliseconds of one step's phases at the current state: propose, verify, accept
        and commit, each captured as its own CUDA graph and replayed ``reps`` times (CUDA only).
        The decode fuses them into one graph; this splits the same work apart. The state is put
        back afterwards."""
        if not self.state.tokens.is_cuda:
            raise ValueError("phase_times needs CUDA")
        view, draft = self.view_for(self.state.max_seq_len), draft and self.k > 0
        saved = [t.clone() for t in self._saved()]
        box: dict = {}

        def restore():
            for t, s in zip(self._saved()[1:3], saved[1:3]):
                t.copy_(s)
        phases = {
            "draft": lambda: box.__setitem__("tree", self._propose(view, draft)),
            "verify": lambda: box.__setitem__("v", self._verify(view, box["tree"])),
            "accept": lambda: box.__setitem__("a", self._accept(*box["v"])),
            "commit": lambda: (restore(), self._commit(0, draft, *box["a"])),
            "restore": restore,  # replayed alone, then taken off the commit's time
        }
        ms = {name: _graph_ms(fn, reps) for name, fn in phases.items()}
        ms["commit"] = max(0.0, ms["commit"] - ms.pop("restore"))
        for t, s in zip(self._saved(), saved):
            t.copy_(s)
        torch.cuda.synchronize()
        return ms


@contextmanager
def gc_paused():
    """Collect now, then keep Python's cyclic GC off until the block ends. A capture must not
    free a CUDA graph: an unreachable old graph (say, of a Decoder replaced for a new batch size)
    that the GC destroys mid-capture invalidates the capture ("operation not permitted when stream
    is capturing"), and torch's ``cuda.graph`` no longer collects on entry."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def capture(fn) -> "torch.cuda.CUDAGraph":
    """``fn``'s device work captured as one CUDA graph (run ``fn`` once beforehand to warm up)."""
    graph = torch.cuda.CUDAGraph()
    with gc_paused(), torch.cuda.graph(graph):
        fn()
    return graph


def _graph_ms(fn, reps: int) -> float:
    """Capture ``fn`` (after one warm-up run) and return its mean replay time in milliseconds."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = capture(fn)
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / reps
