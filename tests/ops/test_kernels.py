"""The compiled chimera:: ops against their pure-PyTorch references."""
import pytest
import torch
from graphs import random_graph

from torch_geometric_chimera.ops import HAS_EXTENSION, CsrOperator, edge_dot, spmm
from torch_geometric_chimera.ops.common import EdgeListOperator, edge_dot_reference, spmm_reference


def csr(num_rows, num_cols, num_edges, index_dtype=torch.long, device="cpu", empty_rows=True):
    row = torch.randint(0, num_rows // 2 if empty_rows else num_rows, (num_edges,)).sort().values
    col = torch.randint(0, num_cols, (num_edges,))
    rowptr = torch.searchsorted(row, torch.arange(num_rows + 1))
    return rowptr.to(device, index_dtype), col.to(device, index_dtype)


def test_extension_is_built():
    # A broken build would silently fall back to the references: fail loudly instead.
    assert HAS_EXTENSION
    assert hasattr(torch.ops.chimera, "spmm") and hasattr(torch.ops.chimera, "edge_dot")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spmm_and_edge_dot_match_reference(index_dtype, dtype, device):
    rowptr, col = csr(30, 25, 90, index_dtype, device)
    weight = torch.randn(90, 3, dtype=dtype, device=device)
    x = torch.randn(25, 3, 5, dtype=dtype, device=device)
    a = torch.randn(30, 3, 5, dtype=dtype, device=device)
    torch.testing.assert_close(spmm(rowptr, col, weight, x), spmm_reference(rowptr, col, weight, x))
    torch.testing.assert_close(edge_dot(rowptr, col, a, x), edge_dot_reference(rowptr, col, a, x))


def test_non_contiguous_inputs(device):
    rowptr, col = csr(20, 20, 50, device=device)
    weight = torch.randn(3, 50, device=device).t()  # [50, 3], not contiguous
    x = torch.randn(20, 7, 3, device=device).transpose(1, 2)  # [20, 3, 7], not contiguous
    assert not weight.is_contiguous() and not x.is_contiguous()
    torch.testing.assert_close(spmm(rowptr, col, weight, x), spmm_reference(rowptr, col, weight, x))
    torch.testing.assert_close(edge_dot(rowptr, col, spmm(rowptr, col, weight, x), x),
                               edge_dot_reference(rowptr, col, spmm_reference(rowptr, col, weight, x), x))


def test_empty_matrix_and_empty_features(device):
    rowptr = torch.zeros(6, dtype=torch.long, device=device)
    col = torch.zeros(0, dtype=torch.long, device=device)
    out = spmm(rowptr, col, torch.zeros(0, 2, device=device), torch.randn(4, 2, 3, device=device))
    assert out.shape == (5, 2, 3) and bool((out == 0).all())
    assert edge_dot(rowptr, col, torch.randn(5, 2, 3, device=device), torch.randn(4, 2, 3, device=device)).shape == (0, 2)
    empty = spmm(torch.zeros(1, dtype=torch.long, device=device), col, torch.zeros(0, 2, device=device),
                 torch.randn(0, 2, 3, device=device))
    assert empty.shape == (0, 2, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_is_at_most_twice_the_reference_error(dtype, device):
    rowptr, col = csr(64, 64, 512, device=device, empty_rows=False)
    weight = torch.rand(512, 2, device=device, dtype=torch.float64)
    x = torch.randn(64, 2, 32, device=device, dtype=torch.float64)
    exact = spmm_reference(rowptr, col, weight, x)
    kernel_error = (spmm(rowptr, col, weight.to(dtype), x.to(dtype)).double() - exact).abs().max()
    reference_error = (spmm_reference(rowptr, col, weight.to(dtype), x.to(dtype)).double() - exact).abs().max()
    assert kernel_error <= 2 * reference_error


def test_out_of_range_column_is_an_error():
    rowptr = torch.tensor([0, 1, 2])
    col = torch.tensor([0, 5])
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.chimera.spmm(rowptr, col, torch.ones(2, 1), torch.ones(3, 1, 2))


def test_mismatched_shapes_and_dtypes_are_errors():
    rowptr, col = csr(4, 4, 6)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.chimera.spmm(rowptr, col, torch.ones(5, 1), torch.ones(4, 1, 2))
    with pytest.raises(RuntimeError, match="share an int32 or int64 dtype"):
        torch.ops.chimera.spmm(rowptr.int(), col, torch.ones(6, 1), torch.ones(4, 1, 2))
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.chimera.edge_dot(rowptr, col, torch.ones(4, 1, 2), torch.ones(4, 1, 2, dtype=torch.float64))


def test_gradcheck_spmm_and_edge_dot():
    rowptr, col = csr(8, 7, 20)
    weight = torch.randn(20, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 2, 3, dtype=torch.float64, requires_grad=True)
    a = torch.randn(8, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, x: spmm(rowptr, col, w, x), (weight, x))
    assert torch.autograd.gradcheck(lambda a, x: edge_dot(rowptr, col, a, x), (a, x))
    assert torch.autograd.gradgradcheck(lambda w, x: spmm(rowptr, col, w, x), (weight, x))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_opcheck(index_dtype, device):
    rowptr, col = csr(10, 9, 30, index_dtype, device)
    weight = torch.randn(30, 2, dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(9, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
    a = torch.randn(10, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.chimera.spmm.default, (rowptr, col, weight, x))
    torch.library.opcheck(torch.ops.chimera.edge_dot.default, (rowptr, col, a, x))


def test_csr_operator_matches_edge_list_operator(device):
    edge_index = random_graph(30, 100, device=device, self_loops=True)
    edge_index = torch.cat([edge_index, edge_index[:, :10]], 1)  # duplicates
    weight = torch.randn(edge_index.size(1), 2, dtype=torch.float64, device=device)
    x = torch.randn(30, 2, 5, dtype=torch.float64, device=device)
    g = torch.randn(30, 2, 5, dtype=torch.float64, device=device)
    fast, ref = CsrOperator(edge_index, 30), EdgeListOperator(edge_index)
    torch.testing.assert_close(fast.matmul(weight, x), ref.matmul(weight, x))
    torch.testing.assert_close(fast.rmatmul(weight, x), ref.rmatmul(weight, x))
    torch.testing.assert_close(fast.edge_dot(g, x), ref.edge_dot(g, x))


def test_spmm_fused_bias_matches_reference_and_passes_opcheck(device):
    rowptr, col = csr(12, 9, 30, device=device)
    weight = torch.randn(30, 2, dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(9, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(12, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
    torch.testing.assert_close(spmm(rowptr, col, weight, x, bias), spmm_reference(rowptr, col, weight, x) + bias)
    assert torch.autograd.gradcheck(lambda w, x, b: spmm(rowptr, col, w, x, b), (weight, x, bias))
    torch.library.opcheck(torch.ops.chimera.spmm.default, (rowptr, col, weight, x, bias))
    with pytest.raises(RuntimeError, match="bias must have shape"):
        torch.ops.chimera.spmm(rowptr, col, weight, x, bias[:3])
