"""DraftModel: an independent small LM that drafts for a larger target with the same vocabulary.

The draft runs through its own ModelRunner and KVCache, laid out slot for slot like the
target's (same left padding). Rollback is free: at each step the draft's cache length is set
back to the committed length, and it re-reads the last ``lookback`` committed tokens (two for a
chain: "the bonus token is new" and "the last draft token was never fed"; depth + 1 for a tree,
whose nodes were fed in scratch slots). That keeps the block shapes static. A chain's forwards
write right after the rolled-back length, so they attend as the target's verification does (the
tree-attention kernel on CUDA, under the target's ``attention`` setting), with their index
tensors and masks made once (``chain_constants``), not rebuilt per token.

Schedules: ``constant`` drafts ``num_tokens`` every step; ``adaptive`` starts at half of that,
grows by one after a step in which every row accepted everything, and shrinks by one after a
step with a rejection. The length γ lives on the device and masks the chain: the draft always
runs ``num_tokens`` forwards (a static shape, capturable) and nodes past γ are padding.

Trees (``tree_width`` > 1), in the manner of EAGLE-2's dynamic trees: the root's top
``tree_width`` tokens form level 1; each further level feeds the ``tree_width`` best frontier
nodes (by cumulative draft log-probability) through the draft at once, under an ancestor mask
in scratch slots, and takes each one's top ``tree_width`` children. After ``tree_depth`` levels
the ``tree_nodes`` best candidates are kept. When sampling, children are drawn without
replacement (Gumbel top-k) and every kept sibling set is a prefix of its draw order, which is
what recursive rejection sampling needs to stay lossless.

Every draft token and ``q`` comes from the draft's logits processed like the target's, with the
request's logits processors at that draft position's own prefix (`specdec.drafters.draw`).
"""
from __future__ import annotations

import torch

from specdec.runner import ModelRunner
from specdec.verifiers.acceptance import StepOutcome
from specdec.verifiers.processors import DraftPaths
from specdec.verifiers.tree import DraftTree

from .base import DecodeContext, DraftSpec, Drafter, VocabularyMismatchError, chain_constants
from .draw import choose, processed
from .tree_search import TreeSearch, top_children

SCHEDULES = ("constant", "adaptive")


class DraftModel(Drafter):
    """Example::

        draft, _ = specdec.load_model("zoo:qwen2.5-coder-0.5b-instruct")
        spec = specdec.wrap(target, drafter=DraftModel(draft, num_tokens=4))
    """

    def __init__(self, model, num_tokens: int = 4, schedule: str = "constant", tree_width: int = 1,
                 tree_depth: int | None = None, tree_nodes: int | None = None):
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        if tree_width < 1:
            raise ValueError(f"tree_width must be >= 1, got {tree_width}")
        if tree_width > 1 and schedule != "constant":
            raise ValueError("the adaptive schedule applies to chains; use tree_width=1 with schedule='adaptive'")
        if tree_depth is not None and tree_depth < 1 or tree_nodes is not None and tree_nodes < 1:
            raise ValueError(f"tree_depth and tree_nodes must be >= 1, got {tree_depth} and {tree_nodes}")
        if tree_width == 1 and (tree_depth is not None or tree_nodes is not None):
            raise ValueError(f"tree_depth={tree_depth} / tree_nodes={tree_nodes} shape a tree, which needs tree_width "
                             ">= 2; a chain (tree_width=1) drafts num_tokens tokens: drop them or raise tree_width")
        self.tree_width = tree_width
        self.tree_depth = tree_depth or num_tokens
        # Candidates a tree can have: width children of the root, then width^2 per further level.
        candidates = tree_width + (self.tree_depth - 1) * tree_width * tree_width
        self.tree_nodes = min(tree_nodes or 2 * tree_width * self.tree_depth, candidates)
        self.search = TreeSearch(tree_width, self.tree_depth, self.tree_nodes) if tree_width > 1 else None
        self.model = model
        self.runner = ModelRunner(model, fuse=None)   # fused projections where the layers allow
        self.num_tokens = num_tokens
        self.schedule = schedule
        tree = tree_width > 1
        # A chain re-reads the bonus token and the last draft token; a tree, its accepted path too.
        # A tree explores (depth - 1) levels of width nodes in scratch slots past the root.
        self.spec = DraftSpec(num_nodes=self.tree_nodes if tree else num_tokens,
                              lookback=self.tree_depth + 1 if tree else 2,
                              scratch_slots=(self.tree_depth - 1) * tree_width if tree else 0,
                              forwards_per_step=self.tree_depth if tree else num_tokens)
        self.gamma = None  # [] long on the device: the chain's current length (adaptive schedule)
        self.cache = None
        self._forward = self.runner.forward   # per-step forwards; compile() compiles them

    @classmethod
    def from_pretrained(cls, spec: str, num_tokens: int = 4, schedule: str = "constant", dtype=None, device=None,
                        **tree):
        """Load the draft with ``specdec.load_model`` (hub id, folder, .gguf or ``zoo:NAME``); a
        folder holding a PEFT adapter (e.g. from ``specdec-train method=distill_lora``) is merged
        into its base first."""
        from pathlib import Path

        if (Path(str(spec)) / "adapter_config.json").is_file():
            from specdec.training import load_draft

            model, _ = load_draft(spec, dtype=dtype, device=device)
        else:
            from specdec.loading import load_model

            model, _ = load_model(spec, dtype=dtype, device=device)
        return cls(model, num_tokens=num_tokens, schedule=schedule, **tree)

    @property
    def num_nodes(self) -> int:
        return self.spec.num_nodes

    def budget_configs(self) -> list[dict]:
        """Chains: every length from the one built down to 1; trees keep their shape."""
        if self.tree_width > 1:
            return [{}]
        top = getattr(self, "_built_tokens", self.num_tokens)
        self._built_tokens = top
        return [{"num_tokens": k} for k in range(top, 0, -1)]

    def configure(self, num_tokens: int | None = None) -> None:
        if num_tokens is None:
            return
        if self.tree_width > 1 or num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens}: only a chain (tree_width=1) takes a length >= 1")
        self.num_tokens = num_tokens
        self.spec = DraftSpec(num_nodes=num_tokens, lookback=2, forwards_per_step=num_tokens)

    def memory_bytes(self, batch: int, cache_len: int, new_tokens: int) -> int:
        """The draft's KV cache (one slot per target slot) and its per-forward logits."""
        from specdec.memory import kv_slot_bytes

        return batch * (cache_len * kv_slot_bytes(self.runner) + self.spec.num_nodes * self.runner.vocab_size * 4)

    def compile(self, options: dict | None) -> None:
        """``torch.compile`` the draft's per-step forwards (not its prefill), with the target's."""
        from specdec.step import compiled

        if self._forward == self.runner.forward:
            self._forward = compiled(self.runner.forward, options or True)

    def bind(self, target: ModelRunner) -> None:
        """Raise if the draft cannot stand in for ``target`` token for token."""
        if self.runner.vocab_size != target.vocab_size:
            raise VocabularyMismatchError(
                f"draft model vocabulary ({self.runner.vocab_size} tokens) does not match the target's "
                f"({target.vocab_size}); a DraftModel must share the target's tokenizer and vocabulary"
            )
        if self.runner.device != target.device:
            raise ValueError(f"draft model is on {self.runner.device} but the target is on {target.device}; "
                             "move both to the same device")

    def begin(self, ctx: DecodeContext) -> None:
        b, cap = ctx.tokens.shape
        if self.cache is None or self.cache.batch != b or self.cache.max_len < cap:
            self.cache = None  # the old cache goes before the new one is allocated
            self.cache = self.runner.new_cache(b, cap)
        self.cache.start.copy_(ctx.start)
        self.cache.lengths.zero_()
        first = self.num_tokens if self.schedule == "constant" else max(1, self.num_tokens // 2)
        if self.gamma is None or self.gamma.device != ctx.tokens.device:
            self.gamma = torch.zeros((), dtype=torch.long, device=ctx.tokens.device)
        self.gamma.fill_(first)  # in place: captured steps read this tensor
        # Prefill everything except the last `lookback` committed tokens; propose() reads those.
        self._prefill(ctx, 0)

    def _prefill(self, ctx: DecodeContext, lo: int) -> None:
        """Feed committed slots ``lo .. max_seq_len - lookback`` of every row into the draft cache.
        Slots past a shorter row's own committed length get whatever the buffer holds there; the
        row's cache length hides them and later steps overwrite them."""
        b, hi = ctx.tokens.shape[0], ctx.max_seq_len - self.lookback
        if hi <= lo:
            return
        n, dev = hi - lo, ctx.tokens.device
        slots = (lo + torch.arange(n, device=dev)).expand(b, n)
        among = torch.ones(n, n, dtype=torch.bool, device=dev).tril().expand(b, n, n)
        self.cache.lengths.fill_(lo)
        self.runner.forward(self.cache, ctx.tokens[:, lo:hi], (slots - ctx.start[:, None]).clamp(min=0), slots,
                            among, view_len=hi, compute_logits=False)

    def resync(self, ctx: DecodeContext, since: int) -> None:
        """Catch up after undrafted steps (a draft policy paused drafting when every row had at least
        ``since`` committed tokens): the steps since then never fed this cache. One prefill-like
        forward, not counted in the statistics' draft forwards."""
        self._prefill(ctx, max(0, since - self.lookback))

    @property
    def lookback(self) -> int:
        """Committed tokens re-read at each step (``spec.lookback``): the engine left-pads prompts
        so they exist. A chain's accepted tokens were fed at their final slots, so only the last
        draft token and the bonus token are new (2). A tree's nodes were fed in scratch slots, so
        the whole accepted path plus the bonus token is re-read (depth + 1)."""
        return self.spec.lookback

    def _read_root(self, ctx: DecodeContext):
        """Roll back, re-read the last ``lookback`` committed tokens; return the root's logits.

        Those slots follow the rolled-back length, so the forward attends like the target's
        verification (the tree kernel on CUDA); the draft follows the target's attention setting."""
        b, dev, w = ctx.tokens.shape[0], ctx.tokens.device, self.lookback
        fixed = chain_constants(b, w, dev)
        self.runner.attention = ctx.target.attention
        slots = ctx.seq_len.unsqueeze(1) - w + fixed.offsets
        self.cache.lengths.copy_(ctx.seq_len - w)
        out = self._forward(self.cache, ctx.tokens.gather(1, slots), (slots - ctx.start.unsqueeze(1)).clamp(min=0),
                            slots, fixed.causal, view_len=ctx.max_seq_len, logits_at=fixed.offsets[w - 1:].expand(b, 1),
                            contiguous=True)
        self.cache.lengths.copy_(ctx.seq_len)
        return out.logits[:, 0]

    def _propose_tree(self, ctx: DecodeContext) -> DraftTree:
        """`TreeSearch` over the draft's own cache: frontier nodes in scratch slots past the root."""
        b, dev, k = ctx.tokens.shape[0], ctx.tokens.device, self.tree_width
        eye = torch.eye(k, dtype=torch.bool, device=dev).expand(b, k, k)

        def step(tokens, hidden, positions, slots, mask, view):
            return self._forward(self.cache, tokens, positions, slots, eye, view_len=view, mask=mask).logits, None

        def expand(logits, paths):
            return top_children(processed(ctx, logits, paths)[0], ctx.params, k, None, self.runner.vocab_size)

        root = expand(self._read_root(ctx).unsqueeze(1), DraftPaths.chain(ctx.tokens[:, :0]))
        return self.search.run(root, None, step, ctx.seq_len, ctx.start, ctx.max_seq_len + self.search.scratch,
                               expand, track_paths=ctx.params.processors.active)

    def propose(self, ctx: DecodeContext) -> DraftTree:
        if self.tree_width > 1:
            return self._propose_tree(ctx)
        b, dev, k = ctx.tokens.shape[0], ctx.tokens.device, self.num_tokens
        logits = self._read_root(ctx)
        fixed, alone = chain_constants(b, k, dev), chain_constants(b, 1, dev).alone
        slots = (ctx.seq_len - 1).unsqueeze(1) + fixed.offsets  # [B, K]: the i-th fed draft token's slot is column i
        positions = slots - ctx.start.unsqueeze(1)
        drafted, dists = [], []
        for i in range(k):
            if i:  # feed the previous draft token at the next slot; logits for the one after
                self.cache.lengths.copy_(slots[:, i])
                logits = self._forward(self.cache, drafted[-1].unsqueeze(1), positions[:, i:i + 1], slots[:, i:i + 1],
                                       alone, view_len=ctx.max_seq_len + i, contiguous=True,
                                       tree_mask=alone).logits[:, -1]
            token, q = choose(ctx, logits, drafted)  # processed with this step's draft so far
            drafted.append(token)
            dists.append(q)
        valid = (fixed.offsets < self.gamma).expand(b, k)  # the adaptive length masks the chain
        q = torch.stack(dists, dim=1) if ctx.params.do_sample else None
        return DraftTree.chain(torch.stack(drafted, dim=1), valid, q=q)

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        """Adaptive schedule, on the device: γ + 1 after a step where every live row accepted its
        whole draft, else γ - 1 (within 1 .. num_tokens)."""
        if self.schedule != "adaptive":
            return
        full = ((outcome.accept_len >= self.gamma) | (ctx.active == 0)).all()
        self.gamma.copy_(torch.where(full, self.gamma + 1, self.gamma - 1).clamp(1, self.num_tokens))
