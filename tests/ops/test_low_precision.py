"""float16 / bfloat16 through every method: factorizations, series and iterations run in float32
and the output comes back in the input dtype. The error against a float64 truth may be at most 2x
the error of the oracle computed at that same precision (flash-attention's criterion)."""
import pytest
import torch
from graphs import batch_graphs, inputs, random_dag, random_graph, row_normalize

from torch_geometric_chimera import ChimeraConv
from torch_geometric_chimera.ops import resolvent_attention
from torch_geometric_chimera.ops.iterative import default_tolerance
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention

LOW = [torch.float16, torch.bfloat16]


def oracle_at(dtype, q, k, v, edge_index, w, num_terms=120):
    """The oracle at that precision: torch.linalg.inv has no float16 / bfloat16, so the power series
    of (I - A)^-1 with enough terms (row sums 0.8: 0.8^120 < 1e-11) computed in ``dtype``."""
    low = [t.to(dtype) for t in (q, k, v, w)]
    return inverse_resolvent_attention(*low[:3], edge_index, low[3], num_terms=num_terms)


def max_error(out, truth):
    return (out.double() - truth).abs().max().item()


def check_low_precision(method, edge_index, batch, n, dtype):
    q, k, v, w = inputs(n, edge_index.size(1), heads=2, state=4, head_dim=4, dtype=torch.float32)
    w = row_normalize(edge_index, w, n)
    truth = inverse_resolvent_attention(*(t.double() for t in (q, k, v)), edge_index, w.double())
    low = [t.to(dtype) for t in (q, k, v, w)]
    out = resolvent_attention(*low[:3], edge_index, low[3], method=method, batch=batch)
    assert out.dtype == dtype
    assert max_error(out, truth) <= 2 * max_error(oracle_at(dtype, q, k, v, edge_index, w), truth)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("method", ["auto", "dense", "band", "iterative"])
def test_cyclic_graphs_in_low_precision(method, dtype):
    edge_index, batch, n = batch_graphs([(m, random_graph(m, 3 * m)) for m in (12, 30, 7)])
    check_low_precision(method, edge_index, batch, n, dtype)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("method", ["dag", "neumann", "line"])
def test_dags_and_lines_in_low_precision(method, dtype):
    if method == "line":
        graphs = [(m, torch.stack([torch.arange(m - 1), torch.arange(1, m)])) for m in (40, 9)]
    else:
        graphs = [(m, random_dag(m, 3 * m)) for m in (12, 30, 7)]
    edge_index, batch, n = batch_graphs(graphs)
    check_low_precision(method, edge_index, batch, n, dtype)


def test_iterative_in_bfloat16_converges_on_random_graphs():
    # The default tolerance follows the dtype; with tol = 1e-3 in bfloat16 arithmetic 11 of 60 of
    # these graphs failed to converge (and the message blamed a spectral radius of 0.5).
    assert default_tolerance(torch.bfloat16) == torch.finfo(torch.bfloat16).eps / 16
    assert default_tolerance(torch.float16) == torch.finfo(torch.float16).eps / 16
    for _ in range(60):
        n = int(torch.randint(5, 40, ()))
        edge_index = random_graph(n, 3 * n)
        q, k, v, w = inputs(n, edge_index.size(1), dtype=torch.float32)
        w = row_normalize(edge_index, w, n, gamma=0.5)
        truth = inverse_resolvent_attention(*(t.double() for t in (q, k, v)), edge_index, w.double())
        low = [t.bfloat16() for t in (q, k, v, w)]
        out = resolvent_attention(*low[:3], edge_index, low[3], method="iterative")
        oracle = oracle_at(torch.bfloat16, q, k, v, edge_index, w, num_terms=24)  # 0.5^24 < 1e-7, far below bfloat16
        assert max_error(out, truth) <= 2 * max_error(oracle, truth)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_layer_in_low_precision_with_the_defaults(dtype):
    # The README graph, whose default method is an exact one that factorizes (it raised
    # "linalg.inv: Low precision dtypes not supported" in bfloat16).
    torch.manual_seed(0)
    edge_index = torch.tensor([[0, 1, 1, 2, 3], [1, 0, 2, 1, 4]])
    x = torch.randn(5, 64)
    conv = ChimeraConv(64, heads=4, state_dim=16)
    expected = conv.double()(x.double(), edge_index)
    low = conv.to(dtype)
    out = low(x.to(dtype), edge_index)
    out.float().sum().backward()
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert max_error(out, expected) < 0.05 * expected.abs().max().item()
