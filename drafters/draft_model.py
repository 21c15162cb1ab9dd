"""DraftModel: an independent small LM that drafts for a larger target with the same vocabulary.

The draft runs through its own ModelRunner and KVCache, laid out slot for slot like the
target's (same left padding). Rollback is free: at each step the draft's cache length is set
back to the committed length, and it re-reads the last two committed tokens, which covers both
"the bonus token is new" and "the last draft token was never fed". That keeps the block shape
static ([B, 2], then [B, 1] per drafted token).

Schedules: ``constant`` drafts ``num_tokens`` every step; ``adaptive`` starts at half of that,
grows by one after a step in which every row accepted everything, and shrinks by one after a
step with a rejection (the node budget stays ``num_tokens``; unused nodes are padding).
"""
from __future__ import annotations

import torch

from specdec.runner import ModelRunner
from specdec.verifiers.acceptance import StepOutcome, sample, warp_probs
from specdec.verifiers.tree import DraftTree

from .base import DecodeContext, VocabularyMismatchError

SCHEDULES = ("constant", "adaptive")


class DraftModel:
    """Example::

        draft, _ = specdec.load_model("zoo:qwen2.5-coder-0.5b-instruct")
        spec = specdec.wrap(target, drafter=DraftModel(draft, num_tokens=4))
    """

    def __init__(self, model, num_tokens: int = 4, schedule: str = "constant"):
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        self.model = model
        self.runner = ModelRunner(model)
        self.num_tokens = num_tokens
        self.schedule = schedule
        self.gamma = num_tokens if schedule == "constant" else max(1, num_tokens // 2)
        self.cache = None
        self.forwards = 0

    @classmethod
    def from_pretrained(cls, spec: str, num_tokens: int = 4, schedule: str = "constant", dtype=None, device=None):
        """Load the draft with ``specdec.load_model`` (hub id, folder, .gguf or ``zoo:NAME``)."""
        from specdec.loading import load_model

        model, _ = load_model(spec, dtype=dtype, device=device)
        return cls(model, num_tokens=num_tokens, schedule=schedule)

    @property
    def num_nodes(self) -> int:
        return self.num_tokens

    def check_target(self, target: ModelRunner) -> None:
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
            self.cache = self.runner.new_cache(b, cap)
        self.cache.start.copy_(ctx.start)
        self.cache.lengths.zero_()
        self.gamma = self.num_tokens if self.schedule == "constant" else max(1, self.num_tokens // 2)
        # Prefill everything except the last two committed tokens; propose() reads those.
        n = ctx.max_seq_len - 2
        if n > 0:
            slots = torch.arange(n, device=ctx.tokens.device).expand(b, n)
            among = torch.ones(n, n, dtype=torch.bool, device=slots.device).tril().expand(b, n, n)
            self.runner.forward(self.cache, ctx.tokens[:, :n], (slots - ctx.start[:, None]).clamp(min=0), slots,
                                among, view_len=n, compute_logits=False)
        self.forwards = 0  # draft forwards of this generate call, prefill excluded

    def propose(self, ctx: DecodeContext) -> DraftTree:
        b = ctx.tokens.shape[0]
        dev = ctx.tokens.device
        gamma, k = self.gamma, self.num_tokens
        slots = ctx.seq_len.unsqueeze(1) - 2 + torch.arange(2, device=dev)  # last two committed
        self.cache.lengths.copy_(ctx.seq_len - 2)  # rollback: drop anything beyond
        tok = ctx.tokens.gather(1, slots)
        among = torch.ones(2, 2, dtype=torch.bool, device=dev).tril().expand(b, 2, 2)
        last = torch.ones(b, 1, dtype=torch.long, device=dev)
        drafted, dists = [], []
        for i in range(gamma):
            pos = (slots - ctx.start.unsqueeze(1)).clamp(min=0)
            out = self.runner.forward(self.cache, tok, pos, slots, among, view_len=ctx.max_seq_len + i,
                                      logits_at=last if i == 0 else None)
            self.forwards += 1
            logits = out.logits[:, -1]
            if ctx.params.do_sample:
                q = warp_probs(logits, ctx.params)
                nxt = sample(q)
                dists.append(q)
            else:
                nxt = logits.argmax(dim=-1)
            drafted.append(nxt)
            # Feed the new token at the next slot; everything before it is now committed here.
            slots = (ctx.seq_len + i).unsqueeze(1)
            self.cache.lengths.copy_(ctx.seq_len + i)
            tok = nxt.unsqueeze(1)
            among = torch.ones(b, 1, 1, dtype=torch.bool, device=dev)
        tokens = torch.zeros(b, k, dtype=torch.long, device=dev)
        tokens[:, :gamma] = torch.stack(drafted, dim=1)
        valid = torch.zeros(b, k, dtype=torch.bool, device=dev)
        valid[:, :gamma] = True
        q = None
        if dists:
            q = torch.zeros(b, k, dists[0].shape[-1], device=dev)
            q[:, :gamma] = torch.stack(dists, dim=1)
        return DraftTree.chain(tokens, valid, q=q)

    def observe(self, outcome: StepOutcome) -> None:
        if self.schedule != "adaptive" or outcome.accepted_host is None:
            return
        if all(a >= self.gamma for a in outcome.accepted_host):
            self.gamma = min(self.num_tokens, self.gamma + 1)
        else:
            self.gamma = max(1, self.gamma - 1)
