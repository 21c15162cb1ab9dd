"""Two proxies for what a decode step costs: its memory-bandwidth floor and its op count.

A decode step must read every weight the forward uses once (embeddings: one row per token)
plus the K/V it attends to. At the card's peak HBM bandwidth that takes ``floor_ms``; a
measured step time far above it means the step is bound by something else (kernel launches,
host work) and is what to attack next.

On a launch-bound GPU a step costs roughly one launch per kernel, so ``count_step_ops`` counts
the aten ops one step issues, by phase, on any device (a CPU run included): what a drafted step
issues beyond a plain one is what it pays beyond its drafting (``scripts/op_count.py``).

Example::

    floor = step_floor(model, batch=1, context=512)
    print(floor.ms, floor.bytes)        # the floor in milliseconds, and the bytes one step reads
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from specdec.kernels.tree_attention import tree_attention_reference

# Peak HBM bandwidth, bytes/s, by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),   # SXM, HBM3
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB", 2.039e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("A10G", 0.6e12),
)


@dataclass
class StepFloor:
    bytes: int          # bytes one step must read
    bandwidth: float | None  # bytes/s of the card, or None if unknown
    ms: float | None    # bytes / bandwidth, in milliseconds


def peak_bandwidth(device: torch.device | str | None = None) -> float | None:
    """Peak memory bandwidth (bytes/s) of a CUDA device, from its name; None if not known."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def step_floor(model, batch: int = 1, context: int = 0, bandwidth: float | None = None) -> StepFloor:
    """Bytes a decode step over ``batch`` rows of ``context`` cached tokens reads, and the time
    that takes at ``bandwidth`` (default: the peak of the model's device, when known)."""
    embed = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed
    if not tied:  # the input embedding is only gathered, a row per token
        weights -= embed.numel() * embed.element_size() - batch * embed.shape[1] * embed.element_size()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * batch * context * kv_heads * head_dim * embed.element_size()
    total = int(weights + kv)
    if bandwidth is None and embed.is_cuda:
        bandwidth = peak_bandwidth(embed.device)
    return StepFloor(bytes=total, bandwidth=bandwidth, ms=1e3 * total / bandwidth if bandwidth else None)


def timed(fn):
    """``(fn(), seconds)``, synchronising CUDA before and after so the time covers the device work."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


# ---------------------------------------------------------------------------------------- op count
# Ops that launch no kernel: allocations and metadata (views are recognised by their schema), and
# the host scalar a Python number becomes in ``torch.where(c, x, -1)`` (a CPU tensor even on CUDA).
_FREE_OPS = {"aten.scalar_tensor.default", "aten.empty.memory_format", "aten.empty_strided.default",
             "aten.empty_like.default", "aten.new_empty.default", "aten.new_empty_strided.default", "aten._unsafe_view.default",
             "aten.lift_fresh.default", "aten.detach.default", "aten.set_.source_Storage_storage_offset"}
PHASES = ("draft", "layout", "mask", "forward", "layers", "kv write", "attention", "accept", "commit", "bookkeeping")


@dataclass
class StepOps:
    """The aten ops one decode step issues, by phase: ``ops[phase][op name]`` counts the ops that
    launch a kernel (views, allocations and ops on empty tensors are left out); ``syncs`` lists
    the ops whose result the host must wait for (``.item()``, ``nonzero``), by phase.

    Phases: ``draft`` (propose and observe), then verification split into ``layout`` (the step's
    tokens, positions, slots and the tree's compiled ancestors), ``mask`` (attention masks),
    ``forward`` (embedding, rotary tables, final norm, LM head), ``layers`` (the decoder layers but
    their attention), ``kv write`` (new K/V into the cache) and ``attention``; then ``accept`` (logits
    processors and the acceptance rule), ``commit`` (tokens and K/V of the kept path, lengths) and
    ``bookkeeping`` (per-step statistics, fault marks). Where a path differs by device the count
    is the CPU's: the K/V commit of a tree that is not a chain is a gather and a scatter per
    buffer here, one Triton launch on CUDA (``specdec.kernels.kv_commit``)."""

    ops: dict[str, Counter]
    syncs: dict[str, Counter]
    num_layers: int

    def by_phase(self) -> dict[str, int]:
        return {p: sum(self.ops.get(p, Counter()).values()) for p in PHASES}

    @property
    def total(self) -> int:
        return sum(self.by_phase().values())

    def per_layer(self) -> float:
        """Ops of one decoder layer (layers, K/V write and attention over the layer count)."""
        phases = self.by_phase()
        return (phases["layers"] + phases["kv write"] + phases["attention"]) / self.num_layers

    def extra_over(self, base: "StepOps") -> dict[str, Counter]:
        """Per phase, the ops this step issues more often than ``base`` does (op name -> surplus)."""
        out = {}
        for p in PHASES:
            more = self.ops.get(p, Counter()) - base.ops.get(p, Counter())
            if more:
                out[p] = more
        return out


def _labels(decoder) -> tuple[dict, dict]:
    """Code objects of the step's functions -> (phase, detail) labels for ``_OpCounter``."""
    import inspect

    from specdec import cache, fused, runner, step
    from specdec.validate import step_faults
    from specdec.verifiers.tree import DraftTree

    def code(fn):
        return inspect.unwrap(fn).__code__

    dec = type(decoder)
    phase = {code(dec._propose): "draft", code(type(decoder.drafter).observe): "draft", code(dec._verify): "verify",
             code(dec._accept): "accept", code(step.commit_step): "commit", code(dec._commit): "bookkeeping",
             code(step_faults): "bookkeeping", code(dec.step): "bookkeeping"}
    detail = {code(step.verify_inputs): "layout", code(DraftTree.compile): "layout",
              code(runner.ModelRunner.forward): "forward", code(cache.KVCache.visible): "mask",
              code(runner.ModelRunner._tree_mask): "mask", code(runner.ModelRunner._within_window): "mask",
              code(fused.FusedLayers.run): "layers", code(fused.run_layer): "layers",
              code(cache.KVCache.update): "kv write", code(runner._specdec_attention): "attention"}
    return phase, detail


class _OpCounter(TorchDispatchMode):
    """Files every aten op under the phase of the innermost step function on the Python stack
    (``_labels``). The tree-attention operator counts as one op and is computed by its torch
    reference, so a CPU run follows the CUDA path."""

    def __init__(self, phase: dict, detail: dict):
        super().__init__()
        self.phase, self.detail = phase, detail
        self.ops: dict[str, Counter] = {}
        self.syncs: dict[str, Counter] = {}

    def where(self) -> str:
        f, inner = sys._getframe(2), None
        while f is not None:
            inner = inner or self.detail.get(f.f_code)
            top = self.phase.get(f.f_code)
            if top == "verify":
                return inner or "forward"
            if top is not None:
                return top
            f = f.f_back
        return "bookkeeping"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.specdec.tree_attention.default:
            out = tree_attention_reference(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        name = str(func)
        if _syncs(func, args):
            self.syncs.setdefault(self.where(), Counter())[name] += 1
        elif not func.is_view and name not in _FREE_OPS and _launches(out):
            self.ops.setdefault(self.where(), Counter())[name] += 1
        return out


def _syncs(func, args) -> bool:
    """Whether the host must wait for the op's result: a value read back (``.item()``) or a shape that
    depends on the data (``nonzero``, indexing with a bool mask; integer indexing does not)."""
    if torch.Tag.data_dependent_output in func.tags:
        return True
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is torch.ops.aten.index.Tensor:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    return True


def _launches(out) -> bool:
    """Whether an op's result has any element (on CUDA an op over empty tensors launches nothing)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    tensors = [t for t in outs if isinstance(t, torch.Tensor)]
    return not tensors or any(t.numel() for t in tensors)


def count_step_ops(decoder, draft: bool = True) -> StepOps:
    """Count the aten ops of one step of ``decoder`` (a ``specdec.step.Decoder`` whose state a
    ``generate`` call left, e.g. ``spec.engine._decoder``) at its current state, by phase
    (``StepOps``). Verification attends through the tree-attention operator, as on CUDA, whatever
    the device; the decoder's buffers are put back afterwards (its drafter's own state is not:
    the next ``generate`` begins it anew).

    Example::

        spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=8))
        spec.generate(ids, max_new_tokens=16)
        ops = count_step_ops(spec.engine._decoder)
        print(ops.by_phase(), ops.total)
    """
    runner, state = decoder.runner, decoder.state
    saved = [t.clone() for t in decoder._saved()]
    attention, runner.attention = runner.attention, "triton"
    view = decoder.view_for(state.max_seq_len)
    mode = _OpCounter(*_labels(decoder))
    try:
        with torch.no_grad(), mode:
            decoder.step(0, view, draft and decoder.k > 0)
    finally:
        runner.attention = attention
        for t, s in zip(decoder._saved(), saved):
            t.copy_(s)
    return StepOps(ops=mode.ops, syncs=mode.syncs, num_layers=runner.num_layers)
