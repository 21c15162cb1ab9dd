"""The memory-bandwidth floor of one decode step: the least time a step can take on a GPU.

A decode step must read every weight the forward uses once (embeddings: one row per token)
plus the K/V it attends to. At the card's peak HBM bandwidth that takes ``floor_ms``; a
measured step time far above it means the step is bound by something else (kernel launches,
host work) and is what to attack next.

Example::

    floor = step_floor(model, batch=1, context=512)
    print(floor.ms, floor.bytes)        # the floor in milliseconds, and the bytes one step reads
"""
from __future__ import annotations

from dataclasses import dataclass

import time

import torch

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
