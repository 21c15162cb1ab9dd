"""AllocMeter (tests/alloc_meter.py): a known pattern of allocations gives a known live count
and peak, rounded as the CUDA caching allocator rounds; views and in-place ops allocate nothing;
storages free through their finalizers; the peak's sites name the lines that allocated."""
import weakref

import torch
from alloc_meter import AllocMeter, rounded


def test_rounding_is_the_cuda_allocators():
    assert [rounded(n) for n in (0, 1, 512, 513, 4000)] == [0, 512, 512, 1024, 4096]


def test_known_pattern_gives_known_peak_and_live():
    weights = torch.zeros(1000)  # made before the meter: never counted
    with AllocMeter() as meter:
        a = torch.empty(100)  # 400 bytes -> 512
        view = a[10:]  # same storage: nothing
        a.add_(1)  # in place: nothing
        b = weights + 1  # 4000 -> 4096; live 4608 (the peak)
        del b  # live 512
        c = torch.ones(300)  # 1200 -> 1536; live 2048
        del a  # the view keeps the storage: still 2048
        live_with_view = meter.live
        del view  # live 1536
    assert meter.peak == 512 + 4096
    assert live_with_view == 512 + 1536 and meter.live == 1536
    assert meter.allocations == 3
    del c
    assert meter.live == 0


def test_peak_sites_name_what_was_live_at_the_peak():
    def big():
        return torch.zeros(2048)  # 8192 bytes

    with AllocMeter(sites=True) as meter:
        small = torch.zeros(10)
        x = big()
        del x
        y = torch.zeros(1000)  # 4096: below the peak, so not in the peak's sites
    sites = meter.peak_sites
    assert [s.bytes for s in sites] == [8192, 512], sites
    assert "big" in sites[0].where and "test_alloc_meter.py" in sites[0].where
    del small, y


def test_existing_storages_freed_inside_count_negative():
    class Thing:
        pass

    thing = Thing()
    dead = weakref.proxy(thing)  # a dead proxy among the live objects must not stop the scan
    del thing
    old = torch.zeros(2048)  # 8192 bytes, live before the meter
    with AllocMeter(existing=True) as meter:
        del old
        fresh = torch.zeros(1024)  # 4096
    assert meter.live == 4096 - 8192 and meter.peak == 0
    with AllocMeter() as plain:
        del fresh
    assert plain.live == 0  # without existing=True, a storage made before is ignored
    del dead
