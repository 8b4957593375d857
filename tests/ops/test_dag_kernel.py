"""chimera::dag_solve against the pure-PyTorch DagSolve reference."""
import pytest
import torch
from graphs import random_dag

from torch_geometric_chimera.ops import GraphTopology, dag_solve
from torch_geometric_chimera.ops.dag import dag_solve_reference
from torch_geometric_chimera.utils import topological_levels


def setup(n, e, heads=2, feat=5, dtype=torch.float64, device="cpu", index_dtype=torch.long):
    edge_index = random_dag(n, e, device=device)
    topology = GraphTopology(edge_index, n)
    level_ptr, order = topology.level_schedule
    csr = topology.operator
    weight = 0.5 * torch.rand(edge_index.size(1), heads, dtype=dtype, device=device)
    x = torch.randn(n, heads, feat, dtype=dtype, device=device)
    return (edge_index, topology.levels, weight, x,
            (level_ptr, order, csr.rowptr.to(index_dtype), csr.col.to(index_dtype), csr.perm))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_dag_solve_matches_reference_values_and_gradients(index_dtype, device):
    edge_index, levels, weight, x, (level_ptr, order, rowptr, col, perm) = setup(80, 300, device=device,
                                                                                  index_dtype=index_dtype)
    weight.requires_grad_(), x.requires_grad_()
    out = dag_solve(level_ptr, order, rowptr, col, weight[perm], x)
    expected = dag_solve_reference(edge_index, levels, weight, x)
    torch.testing.assert_close(out, expected)
    cot = torch.randn(out.shape, dtype=out.dtype, device=device)
    for a, b in zip(torch.autograd.grad((out * cot).sum(), (weight, x)),
                    torch.autograd.grad((expected * cot).sum(), (weight, x))):
        torch.testing.assert_close(a, b)


def test_dag_solve_non_contiguous_and_empty():
    edge_index, levels, weight, x, (level_ptr, order, rowptr, col, perm) = setup(30, 60)
    x_nc = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not x_nc.is_contiguous()
    torch.testing.assert_close(dag_solve(level_ptr, order, rowptr, col, weight[perm], x_nc),
                               dag_solve_reference(edge_index, levels, weight, x))
    empty = dag_solve(torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                      torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                      torch.zeros(0, 2), torch.zeros(0, 2, 3))
    assert empty.shape == (0, 2, 3)


def test_dag_solve_rejects_a_wrong_level_order():
    edge_index = torch.tensor([[0, 1], [1, 2]])
    topology = GraphTopology(edge_index, 3)
    csr = topology.operator
    level_ptr = torch.tensor([0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="does not go from an earlier level to a later one"):
        torch.ops.chimera.dag_solve(level_ptr, torch.tensor([2, 1, 0]), csr.rowptr, csr.col, torch.ones(2, 1),
                                    torch.ones(3, 1, 1))


def test_gradcheck_and_opcheck_dag_solve():
    _, _, weight, x, (level_ptr, order, rowptr, col, perm) = setup(12, 25, feat=2)
    w = weight[perm].detach().requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda w, x: dag_solve(level_ptr, order, rowptr, col, w, x), (w, x))
    assert torch.autograd.gradgradcheck(lambda w, x: dag_solve(level_ptr, order, rowptr, col, w, x), (w, x))
    torch.library.opcheck(torch.ops.chimera.dag_solve.default, (level_ptr, order, rowptr, col, w, x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_is_at_most_twice_the_reference_error(dtype):
    edge_index, levels, weight, x, (level_ptr, order, rowptr, col, perm) = setup(64, 150, feat=32)
    exact = dag_solve_reference(edge_index, levels, weight, x)
    kernel = dag_solve(level_ptr, order, rowptr, col, weight[perm].to(dtype), x.to(dtype)).double()
    ref = dag_solve_reference(edge_index, levels, weight.to(dtype), x.to(dtype)).double()
    assert (kernel - exact).abs().max() <= 2 * (ref - exact).abs().max()


def test_level_schedule_is_topological():
    edge_index = random_dag(50, 120)
    topology = GraphTopology(edge_index, 50)
    level_ptr, order = topology.level_schedule
    levels = topological_levels(edge_index, 50)
    assert torch.equal(levels[order], torch.sort(levels).values)
    assert level_ptr[0] == 0 and level_ptr[-1] == 50


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_fused_dag_attention_matches_solve_then_contract(index_dtype):
    from torch_geometric_chimera.ops import dag_attention
    from torch_geometric_chimera.ops.common import read_state, to_state
    edge_index, levels, weight, _, (level_ptr, order, rowptr, col, perm) = setup(60, 200, index_dtype=index_dtype)
    q, k, v = (torch.randn(60, 2, d, dtype=torch.float64, requires_grad=True) for d in (3, 3, 4))
    weight.requires_grad_()
    fused = dag_attention(level_ptr, order, rowptr, col, weight[perm], q, k, v)
    expected = read_state(q, dag_solve_reference(edge_index, levels, weight, to_state(k, v)), 4)
    torch.testing.assert_close(fused, expected)
    cot = torch.randn_like(fused)
    for a, b in zip(torch.autograd.grad((fused * cot).sum(), (q, k, v, weight)),
                    torch.autograd.grad((expected * cot).sum(), (q, k, v, weight))):
        torch.testing.assert_close(a, b)


def test_gradcheck_and_opcheck_dag_attention():
    _, _, weight, _, (level_ptr, order, rowptr, col, perm) = setup(10, 20, feat=2)
    w = weight[perm].detach().requires_grad_()
    q, k, v = (torch.randn(10, 2, d, dtype=torch.float64, requires_grad=True) for d in (2, 2, 3))
    op = torch.ops.chimera.dag_attention
    assert torch.autograd.gradcheck(lambda w, q, k, v: op(level_ptr, order, rowptr, col, w, q, k, v)[0], (w, q, k, v))
    # a gradient that reaches the returned state directly (grad_state) is handled too
    assert torch.autograd.gradcheck(lambda w, q, k, v: op(level_ptr, order, rowptr, col, w, q, k, v)[1].sin().sum(),
                                    (w, q, k, v))
    torch.library.opcheck(op, (level_ptr, order, rowptr, col, w, q, k, v))
    y, state = op(level_ptr, order, rowptr, col, w.detach(), q.detach(), k.detach(), v.detach())
    from torch_geometric_chimera.ops._extension import transpose_csr
    rowptr_t, col_t, perm_t = transpose_csr(rowptr, col, 10)
    torch.library.opcheck(torch.ops.chimera.dag_attention_backward,
                          (level_ptr, order, rowptr_t, col_t, w.detach()[perm_t], q.detach(), k.detach(), v.detach(),
                           state, torch.randn_like(y)))
