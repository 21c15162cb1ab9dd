"""AllocMeter: the live bytes of tensors created while it is on, and their peak, on any device.

A ``TorchDispatchMode`` that sees every aten op's outputs. An output whose storage is new (not
one of the op's inputs' storages, not already tracked) is an allocation: its bytes are rounded
up as the CUDA caching allocator rounds them (a multiple of 512, and no block for an empty
tensor) and stay live until the storage dies, which a weakref finalizer on it reports. Views
and in-place ops share a storage, so they allocate nothing. Storages made before the meter
started are never counted, nor freed from the count.

What it cannot see: workspace a kernel allocates and frees inside one op (on CUDA
``max_memory_allocated`` sees that too), and memory not made by aten ops.
With ``existing=True`` a storage made before the meter started counts as minus its bytes once
it dies (it was in the starting value), as ``torch.cuda.memory_allocated`` would have it.

With ``sites=True`` every allocation records the Python frames that made it (outside torch and
transformers, by default),
and ``peak_sites`` lists what was live at the peak, largest first.

Example::

    with AllocMeter(sites=True) as meter:
        model.generate(ids)
    meter.peak, meter.peak_sites[:5]
"""
from __future__ import annotations

import gc
import traceback
import weakref
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BLOCK = 512  # the CUDA caching allocator's rounding of every block


def rounded(nbytes: int) -> int:
    """Bytes the CUDA caching allocator hands out for a request of ``nbytes``."""
    return 0 if nbytes == 0 else -(-nbytes // BLOCK) * BLOCK


@dataclass
class Site:
    bytes: int  # rounded bytes live at the peak from this site
    count: int  # allocations
    where: str  # innermost frames outside torch, "file:line function" joined by " <- "


class AllocMeter(TorchDispatchMode):
    """``live``: bytes of tracked storages alive now; ``peak``: the most ``live`` has been."""

    def __init__(self, sites: bool = False, depth: int = 4, skip: tuple[str, ...] = ("/torch/", "/transformers/"),
                 existing: bool = False):
        super().__init__()
        self.sites, self.depth, self.skip, self.existing = sites, depth, skip, existing
        self.live = self.peak = 0
        self._alive: dict[int, tuple[int, str]] = {}  # id(storage) -> (rounded bytes, site)
        self._at_peak: dict[int, tuple[int, str]] = {}
        self.allocations = 0

    def __enter__(self):
        if self.existing:
            self._watch_existing()
        return super().__enter__()

    def _watch_existing(self) -> None:
        """Count frees of storages that were live before the meter started, as negative bytes
        (so ``live`` follows what ``torch.cuda.memory_allocated`` minus its starting value would)."""
        seen = set()
        # type(), not isinstance: isinstance reads __class__, which a dead weakref proxy refuses
        # and some lazy modules answer with a warning.
        tensors = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]
        for t in tensors:
            storage = t.untyped_storage()
            if id(storage) not in seen and storage.nbytes():
                seen.add(id(storage))
                weakref.finalize(storage, self._gone, rounded(storage.nbytes()))

    def _gone(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._alive or _ptr(t) in inputs or storage.nbytes() == 0:
            return
        size = rounded(storage.nbytes())
        self._alive[key] = (size, self._site() if self.sites else "")
        weakref.finalize(storage, self._free, key)
        self.allocations += 1
        self.live += size
        if self.live > self.peak:
            self.peak = self.live
            if self.sites:
                self._at_peak = dict(self._alive)

    def reset_peak(self) -> None:
        """Start the peak again from what is live now (say, to see one phase of a call)."""
        self.peak = self.live
        self._at_peak = dict(self._alive)

    def _free(self, key: int) -> None:
        size, _ = self._alive.pop(key, (0, ""))
        self.live -= size

    def _site(self) -> str:
        frames = [f for f in traceback.extract_stack()[:-3] if not any(s in f.filename for s in self.skip)]
        inner = frames[-self.depth:][::-1]
        return " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in inner)

    @property
    def peak_sites(self) -> list[Site]:
        """What was live at the peak, grouped by site, largest first (needs ``sites=True``)."""
        if not self.sites:
            raise ValueError("peak_sites needs AllocMeter(sites=True)")
        total, count = Counter(), Counter()
        for size, where in self._at_peak.values():
            total[where] += size
            count[where] += 1
        return [Site(b, count[w], w) for w, b in total.most_common()]


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()
