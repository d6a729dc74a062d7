"""Mixed precision must see weights changed inside it: the engine prunes and fits weights in place
within one autocast region, and torch's cast cache would otherwise keep serving the dense copy; and the
CPU allocator's retained heap (no fresh pages for every large tensor of a measurement)."""

import pytest
import torch

from smartprune.adapters import get_adapter
from smartprune.compression.allocation import sensitivity, units
from smartprune.device import autocast

from .conftest import trained_tiny_model


def test_a_weight_changed_in_place_inside_autocast_changes_the_output(device):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8).to(device)
    x = torch.randn(4, 16, device=device)
    with autocast(torch.device(device), torch.bfloat16):
        before = layer(x)
        with torch.no_grad():
            layer.weight.zero_()  # as a pruning stage does, between two forward passes
        after = layer(x)
    # zero weights leave the bias alone: by hand, every row of the output is the bias
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after.float(), layer.bias.detach().expand(4, 8).float(), atol=1e-2, rtol=1e-2)


def test_the_allocation_measures_block_units_in_bfloat16(kind, pattern_calib):
    """On the first GPU run every block unit's loss curve was zero in bfloat16 (the cast cache), so
    the allocation pruned blocks for free; in bfloat16 the curves must follow float32's."""
    model = trained_tiny_model(kind)  # predicts well, so pruning a block's matrices costs loss
    adapter = get_adapter(model)
    block_units = [u for u in units(adapter, embedding=False, blocks=True) if u.block == 0]
    curves = {}
    for dtype in (torch.float32, torch.bfloat16):
        with autocast(torch.device("cpu"), dtype):
            curves[dtype] = sensitivity(adapter, block_units, pattern_calib.ids, pattern_calib.eval_ids,
                                        (0.5, 0.9), "frequency", progress=False)
    costly = [u.name for u in block_units if curves[torch.float32][u.name][-1] > 0.01]
    assert costly, curves[torch.float32]  # 90% of some unit of block 0 costs loss in float32 ...
    for name in costly:  # ... and in bfloat16 about as much
        full, half = curves[torch.float32][name], curves[torch.bfloat16][name]
        assert half[-1] > 0.5 * full[-1], (name, full, half)


def test_retained_heap_serves_large_tensors_from_the_heap_and_gives_it_back():
    import ctypes

    from smartprune.device import _glibc, retained_heap

    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc's allocator only, 2.33 or later (mallinfo2)")

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                         "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = Info

    def mapped(mib: int) -> int:  # bytes mapped apart from the heap while a tensor of `mib` MiB lives
        before = libc.mallinfo2().hblkhd
        t = torch.ones(mib << 18)
        after = libc.mallinfo2().hblkhd
        del t
        return after - before

    def above_free() -> int:  # MiB above every chunk earlier tests left free in the heap (glibc would reuse one)
        return max(320, (libc.mallinfo2().fordblks >> 20) + 64)

    big = above_free()
    assert mapped(big) >= big << 20  # glibc's default: a fresh mapping for a large block, unmapped when freed
    with retained_heap():
        assert mapped(64) == 0 and mapped(64) == 0  # from the heap, kept for the next one
        with retained_heap():  # nested (an evaluation inside a recovery): the outer one's setting stays ...
            pass
        assert mapped(64) == 0  # ... after the inner one ends
    big = above_free()
    assert mapped(big) >= big << 20  # the default back after
