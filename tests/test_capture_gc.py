"""A CUDA-graph capture runs with Python's cyclic GC paused (specdec.step.gc_paused): a graph
that the GC frees mid-capture invalidates the capture. The capture itself is checked on the GPU
(tests/test_bench_core.py's CUDA test replaces a batch-1 Decoder by a batch-2 one and captures)."""
import gc
import weakref

import pytest

from specdec.step import gc_paused


class _Node:
    pass


def test_gc_is_collected_on_entry_off_inside_and_restored_after():
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # an unreachable cycle once the names go
    ref = weakref.ref(a)
    del a, b
    assert gc.isenabled()
    with gc_paused():
        assert ref() is None, "the cycle must be collected before the capture starts"
        assert not gc.isenabled()
    assert gc.isenabled()


def test_gc_comes_back_after_an_error_and_stays_off_if_it_was_off():
    with pytest.raises(RuntimeError):
        with gc_paused():
            raise RuntimeError("capture failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
