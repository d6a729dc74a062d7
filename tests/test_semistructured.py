"""2:4 semi-structured sparsity: which matrices qualify, the swap, and the GPU kernels where a GPU is."""

import pytest
import torch

from smartprune.errors import DeviceError
from smartprune.modules.masked import Projection
from smartprune.modules.semistructured import SemiStructuredProjection, is_two_four, use_semi_structured


def test_two_four_is_counted_along_each_outputs_inputs_by_hand():
    assert is_two_four(torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3]]))
    assert not is_two_four(torch.tensor([[1.0, 1, 2, 0, 0, 0, 0, 3]]))  # three in the first group
    assert not is_two_four(torch.tensor([[1.0, 0, 2, 0, 0, 0]]))  # six inputs: no whole groups
    # two per group of consecutive inputs, not per column: the transpose of a 2:4 matrix need not be
    w = torch.tensor([[1.0, 2, 0, 0]] * 4)
    assert is_two_four(w) and not is_two_four(w.T)


def _two_four(d_in: int, d_out: int) -> torch.Tensor:
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(d_out, d_in // 4, 4, dtype=torch.bool)
    keep[..., :2] = True
    return (w * keep.view(d_out, d_in)).T.contiguous()  # d_in x d_out


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Projection(_two_four(64, 128), torch.randn(128))
        self.b = Projection(torch.randn(128, 64))  # dense: stays
        self.c = Projection(_two_four(64, 64)[:, :48].contiguous())  # 2:4 but 48 outputs: not a kernel tile

    def forward(self, x):
        return self.b(self.a(x)).sum() + self.c(x).sum()


def test_only_2_4_projections_of_whole_tiles_are_swapped_and_outputs_stay():
    net = _Net()
    x = torch.randn(3, 5, 64)
    ref = net.a(x)
    # The real conversion runs on CUDA only; a stand-in that keeps the dense W^T checks the plumbing.
    swapped = use_semi_structured(net, torch.bfloat16, convert=lambda w_t: w_t)
    assert swapped == ["a"]
    assert isinstance(net.a, SemiStructuredProjection) and type(net.b) is Projection and type(net.c) is Projection
    out = net.a(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.02)  # bf16 product


def test_a_model_on_the_cpu_is_refused_in_one_line():
    with pytest.raises(DeviceError, match="CUDA GPU"):
        use_semi_structured(_Net())
    with pytest.raises(DeviceError, match="float16 or bfloat16"):
        use_semi_structured(_Net(), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured kernels need a CUDA GPU")
def test_on_a_gpu_the_semi_structured_product_equals_the_dense_one():
    net = _Net().cuda()
    x = torch.randn(64, 64, device="cuda")
    ref = net.a(x.bfloat16().float())
    assert use_semi_structured(net) == ["a"]
    assert isinstance(net.a.weight, torch.sparse.SparseSemiStructuredTensor)
    from smartprune.modules.packed import resident_bytes

    assert 0 < resident_bytes(net.a) < 64 * 128 * 2  # half the bf16 values plus their positions
    torch.testing.assert_close(net.a(x), ref, atol=0.1, rtol=0.02)
