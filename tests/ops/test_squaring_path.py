"""The ``squaring`` path (ops/squaring.py): one padded batch of graphs, the squaring trick, the exact
resolvent backward. Values and gradients against the inverse, gradcheck, the squaring count, the
number of operations, and the error of tf32 / bf16 products."""

import weakref

import pytest
import torch
from dispatch_count import CountOps
from torch.utils._python_dispatch import TorchDispatchMode

from torch_geometric_chimera.nn.adjacency import dag_adjacency, general_adjacency
from torch_geometric_chimera.ops import common, squaring
from torch_geometric_chimera.ops.dense import dense_resolvent_attention
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention, squaring_resolvent
from torch_geometric_chimera.ops.squaring import (DEFAULT_TOL, choose_buckets, padded_adjacency, round_to_precision,
                                                  squaring_chain, squaring_resolvent_attention, squarings_for_bound,
                                                  squarings_for_depth)
from torch_geometric_chimera.utils import topological_levels


def graph_batch(sizes, kind="general", heads=2, state=3, head_dim=4, dtype=torch.float64, seed=0, shuffle=True,
                edges_per_node=2):
    """Graphs of the given sizes (0 = an empty graph, its id unused by any node) in one batch.
    ``general``: random directed edges with cycles, self-loops and duplicate edges, weights with
    rows of |A| summing to at most 0.6; ``dag``: edges forward in a random order, weights of any sign.
    Some nodes are isolated. Nodes are shuffled, so ``batch`` is not sorted."""
    gen = torch.Generator().manual_seed(seed)
    sizes_t = torch.tensor(sizes)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), sizes_t)
    num_nodes = int(sizes_t.sum())
    first = torch.cumsum(sizes_t, 0) - sizes_t
    graph = batch[torch.randint(0, max(num_nodes, 1), (edges_per_node * num_nodes,), generator=gen)]
    n = sizes_t[graph]
    a = (torch.rand(graph.numel(), generator=gen) * n).long()
    b = (torch.rand(graph.numel(), generator=gen) * n).long()
    if kind == "dag":
        keep = a < b
        a, b, graph = a[keep], b[keep], graph[keep]
    edge_index = torch.stack([first[graph] + a, first[graph] + b])
    if kind == "general":  # one duplicated edge and one self-loop for sure
        edge_index = torch.cat([edge_index, edge_index[:, :1], edge_index[:1, :1].repeat(2, 1)], 1)
        weight = torch.rand(edge_index.size(1), heads, generator=gen, dtype=dtype)
        rows = torch.zeros(num_nodes, heads, dtype=dtype).index_add(0, edge_index[1], weight)
        weight = 0.6 * weight / rows[edge_index[1]]
    else:
        weight = torch.randn(edge_index.size(1), heads, generator=gen, dtype=dtype)
    if shuffle:
        perm = torch.randperm(num_nodes, generator=gen)
        new_id = torch.argsort(perm)
        edge_index, batch = new_id[edge_index], batch[perm]
    q, k = (torch.randn(num_nodes, heads, state, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(num_nodes, heads, head_dim, generator=gen, dtype=dtype)
    return q, k, v, edge_index, weight, batch


def values_and_grads(fn, q, k, v, weight, grad):
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v, weight)]
    y = fn(*inputs)
    return (y.detach(), *torch.autograd.grad(y, inputs, grad))


SIZES = [5, 0, 9, 1, 12, 3, 7]  # an empty graph and a one-node graph


@pytest.mark.parametrize("kind", ["general", "dag"])
@pytest.mark.parametrize("max_buckets", [1, 3])
def test_values_and_gradients_equal_the_inverse(kind, max_buckets, monkeypatch):
    monkeypatch.setattr(squaring, "LAUNCH_S", 0.0)  # launches free: as many buckets as allowed
    if max_buckets > 1:
        assert len(choose_buckets(SIZES, max_buckets, lambda g, m: squaring.bucket_cost(g, m, 2, 3, 4, 4))) == 3
    q, k, v, edge_index, weight, batch = graph_batch(SIZES, kind)
    depth = int(topological_levels(edge_index, batch.numel()).max()) if kind == "dag" else None
    grad = torch.randn(q.size(0), q.size(1), v.size(-1), dtype=q.dtype)
    got = values_and_grads(lambda q_, k_, v_, w_: squaring_resolvent_attention(
        q_, k_, v_, edge_index, w_, batch, depth=depth, max_buckets=max_buckets), q, k, v, weight, grad)
    inverse = values_and_grads(lambda q_, k_, v_, w_: inverse_resolvent_attention(q_, k_, v_, edge_index, w_),
                               q, k, v, weight, grad)
    dense = values_and_grads(lambda q_, k_, v_, w_: dense_resolvent_attention(q_, k_, v_, edge_index, w_, batch),
                             q, k, v, weight, grad)
    for a, b, c in zip(got, inverse, dense):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_gradcheck_float64():
    q, k, v, edge_index, weight, batch = graph_batch([4, 0, 3, 5], "general", heads=2, state=2, head_dim=2)
    inputs = [t.requires_grad_() for t in (weight, q, k, v)]
    # float64: k from the bound at float64's roundoff, so the truncated forward and the exact
    # resolvent backward agree to ~1e-16, far below gradcheck's tolerance.
    torch.autograd.gradcheck(lambda w, q_, k_, v_: squaring_resolvent_attention(q_, k_, v_, edge_index, w, batch),
                             inputs)
    dag = graph_batch([4, 3, 5], "dag", heads=1, state=2, head_dim=2, seed=1)
    inputs = [t.requires_grad_() for t in (dag[4], *dag[:3])]
    torch.autograd.gradcheck(lambda w, q_, k_, v_: squaring_resolvent_attention(q_, k_, v_, dag[3], w, dag[5],
                                                                                depth=4), inputs)


@pytest.mark.parametrize("seed", range(3))
def test_the_squaring_count_is_exact_on_dags(seed):
    sizes = [20, 33, 8, 17]
    q, k, v, edge_index, weight, batch = graph_batch(sizes, "dag", seed=seed, edges_per_node=3)
    depth = int(topological_levels(edge_index, batch.numel()).max())
    k_exact = squarings_for_depth(depth)
    assert 2 ** k_exact >= depth + 1 > 2 ** (k_exact - 1) or k_exact == 1
    exact = inverse_resolvent_attention(q, k, v, edge_index, weight)
    torch.testing.assert_close(squaring_resolvent_attention(q, k, v, edge_index, weight, batch, depth=depth), exact)
    torch.testing.assert_close(squaring_resolvent_attention(q, k, v, edge_index, weight, batch,
                                                            num_squarings=k_exact), exact)
    # max_nodes - 1 bounds the depth of every DAG: exact without knowing the depth.
    torch.testing.assert_close(squaring_resolvent_attention(q, k, v, edge_index, weight, batch,
                                                            depth=max(sizes) - 1), exact)
    if k_exact > 1:  # one squaring fewer misses the longest paths
        fewer = squaring_resolvent_attention(q, k, v, edge_index, weight, batch, num_squarings=k_exact - 1)
        assert not torch.allclose(fewer, exact)


def test_the_squaring_count_from_the_bound():
    for gamma in (0.0, 0.3, 0.9, 0.99):
        for tol in (2.0 ** -8, 2.0 ** -24, 2.0 ** -53):
            k = squarings_for_bound(gamma, tol)
            assert gamma ** (2 ** k) <= tol
            assert k == 1 or gamma ** (2 ** (k - 1)) > tol  # the fewest
    # The documented counts for gamma = 0.9: float32, tf32, bf16, float64.
    assert [squarings_for_bound(0.9, DEFAULT_TOL[p]) for p in ("float32", "tf32", "bf16", "float64")] == [8, 7, 6, 9]
    # On general graphs the error obeys the bound gamma^(2^k) / (1 - gamma) in the inf-norm of L.
    q, k, v, edge_index, weight, batch = graph_batch([30, 25], "general", heads=1)
    delta = torch.rand(batch.numel(), 1, dtype=torch.float64)
    weight, _ = general_adjacency(delta, edge_index, torch.zeros_like(delta), gamma=0.9)
    adj = padded_adjacency(edge_index, weight, batch)
    exact = torch.linalg.inv(torch.eye(adj.size(-1), dtype=adj.dtype) - adj)
    for num in (2, 3, 5):
        error = (squaring_chain(adj, num) - exact).abs().sum(-1).amax()
        assert 0 < float(error) <= 0.9 ** (2 ** num) / (1 - 0.9)


def test_the_measured_row_sums_choose_k_and_refuse_a_divergent_series():
    q, k, v, edge_index, weight, batch = graph_batch([6, 8], "general")
    exact = inverse_resolvent_attention(q, k, v, edge_index, weight)
    torch.testing.assert_close(squaring_resolvent_attention(q, k, v, edge_index, weight, batch), exact)
    with pytest.raises(ValueError, match="edge_weight: a row of \\|A\\| sums to .* >= 1"):
        squaring_resolvent_attention(q, k, v, edge_index, 2 * weight, batch)


def test_padded_adjacency_adds_duplicates_in_local_coordinates():
    edge_index = torch.tensor([[0, 0, 2, 3, 4, 4], [1, 1, 2, 4, 3, 3]])
    batch = torch.tensor([0, 0, 0, 2, 2])  # graph 1 is empty
    weight = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    adj = padded_adjacency(edge_index, weight, batch)
    expected = torch.zeros(3, 1, 3, 3)
    expected[0, 0, 1, 0] = 3.0  # duplicate 0 -> 1
    expected[0, 0, 2, 2] = 3.0  # self-loop
    expected[2, 0, 1, 0] = 4.0  # 3 -> 4 is local 0 -> 1
    expected[2, 0, 0, 1] = 11.0  # duplicate 4 -> 3
    torch.testing.assert_close(adj, expected)
    assert padded_adjacency(edge_index, weight.view(-1), batch, max_nodes=5).shape == (3, 1, 5, 5)


def test_squaring_chain_equals_the_reference():
    adj = 0.3 * torch.randn(3, 2, 7, 7, dtype=torch.float64)
    for num in (1, 2, 4):
        torch.testing.assert_close(squaring_chain(adj, num), squaring_resolvent(adj, num))


class LiveBatches(TorchDispatchMode):
    """The most tensors of ``shape`` (distinct storages, views not counted) alive at once, checked
    after every operation inside the context: the peak memory of a loop, in units of one batch."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.refs, self.peak = tuple(shape), [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape and not func.is_view:
            self.refs.append(weakref.ref(out))
        alive = {ref().untyped_storage().data_ptr() for ref in self.refs if ref() is not None}
        self.peak = max(self.peak, len(alive))
        return out


def test_the_chain_keeps_three_m_by_m_batches_alive_not_four():
    # L, A^(2^j) and the product being formed; A itself is the first power only and must not stay
    # alive through the loop (the caller hands over a temporary, as padded_attention_forward does).
    shape = (6, 20, 20)
    with LiveBatches(shape) as live:
        resolvent = squaring_chain(0.05 * torch.rand(shape), 5)
    assert live.peak == 3, live.peak
    assert resolvent.shape == shape


def matmul_flags():
    """Every flag of the float32 matmul precision as the user sees it; a getter that raises on a mix
    of the legacy and the new API (ATen's consistency checks) reads as "raises"."""
    def read(getter):
        try:
            return getter()
        except RuntimeError:
            return "raises"
    return (read(torch.get_float32_matmul_precision), read(torch._C._get_cublas_allow_tf32),
            torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision)


@pytest.fixture
def restore_matmul_flags():
    legacy, generic = torch.get_float32_matmul_precision(), torch.backends.fp32_precision
    cuda, mkldnn = torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision
    yield
    torch.backends.fp32_precision = generic
    torch.set_float32_matmul_precision(legacy)
    torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = cuda, mkldnn


#: The global settings a user may have made before calling the squaring path (Lightning sets
#: "high"; the last three mix the two APIs, which ATen itself refuses on the next cuBLAS call).
GLOBAL_MATMUL_SETTINGS = {
    "default": lambda: None,
    "precision highest": lambda: torch.set_float32_matmul_precision("highest"),
    "precision high": lambda: torch.set_float32_matmul_precision("high"),
    "precision medium": lambda: torch.set_float32_matmul_precision("medium"),
    "allow_tf32 True": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "allow_tf32 False": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", False),
    "cuda fp32_precision ieee": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"),
    "mkldnn fp32_precision bf16": lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
    "cuda fp32_precision tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "generic fp32_precision tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
    "high, then cuda ieee": lambda: (torch.set_float32_matmul_precision("high"),
                                     setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")),
}


@pytest.mark.parametrize("setting", GLOBAL_MATMUL_SETTINGS)
@pytest.mark.parametrize("precision", ["float32", "tf32"])
def test_cuda_products_set_both_tf32_flags_and_restore_every_flag(restore_matmul_flags, setting, precision):
    GLOBAL_MATMUL_SETTINGS[setting]()
    before = matmul_flags()
    with squaring._cuda_fp32_precision(precision):
        # What ATen asks on every cuBLAS handle fetch; it raises unless the legacy and new flags agree.
        assert torch._C._get_cublas_allow_tf32() == (precision == "tf32")
    assert matmul_flags() == before
    with pytest.raises(KeyError), squaring._cuda_fp32_precision(precision):  # restored on an error too
        raise KeyError
    assert matmul_flags() == before


def count_forward_backward(sizes, **kwargs):
    q, k, v, edge_index, weight, batch = graph_batch(sizes, "general", heads=4, state=8, head_dim=8, shuffle=False,
                                                     dtype=torch.float32)
    inputs = [t.requires_grad_() for t in (q, k, v, weight)]
    grad = torch.ones(q.size(0), 4, 8)
    with CountOps() as counter:
        y = squaring_resolvent_attention(*inputs[:3], edge_index, inputs[3], batch, **kwargs)
        y.backward(grad)
    return counter.ops


def test_the_number_of_operations_does_not_depend_on_the_graphs(monkeypatch):
    # As on an accelerator: no value checks read on the host (on CPU they are free and always on).
    monkeypatch.setattr(common, "host_reads_allowed", lambda t: False)
    few = [10 + 2 * (i % 46) for i in range(64)]  # 64 graphs, 46 distinct sizes, 10 to 100 nodes
    many = [10 + (i % 92) for i in range(128)]  # 128 graphs, 92 distinct sizes, 10 to 101 nodes
    assert (len(set(few)), len(set(many))) == (46, 92)
    counts = []
    for sizes in (few, many):
        ops = count_forward_backward(sizes, gamma=0.9, max_nodes=max(sizes), num_graphs=len(sizes))
        assert "aten._local_scalar_dense.default" not in ops  # nothing read on the host: no synchronization
        counts.append(sum(ops.values()))
    # k = 8 squarings (gamma = 0.9, float32): 14 chain products, 2 + 7 attention and gradient products.
    assert counts[0] == counts[1] <= 100, counts
    # The layout depends on the topology only: computed once and passed in, it saves a dozen operations.
    q, _, _, edge_index, _, batch = graph_batch(few, "general", heads=4, shuffle=False)
    layout = squaring.padded_layout(edge_index, q.size(0), batch, max(few), len(few))
    assert sum(count_forward_backward(few, gamma=0.9, layout=layout).values()) <= counts[0] - 10


def test_bucketing_by_the_cost_model():
    # Launches cost 1, flops nothing: one bucket; launches free: one bucket per distinct size (at most 3).
    sizes = [3, 3, 5, 9, 9, 9, 30, 0]
    assert choose_buckets(sizes, 4, lambda g, m: 1.0) == [30]
    assert choose_buckets(sizes, 3, lambda g, m: g * m ** 3) == [5, 9, 30]
    assert choose_buckets(sizes, 2, lambda g, m: g * m ** 3) == [9, 30]
    assert choose_buckets([0, 0], 2, lambda g, m: 1.0) == []
    # The default GPU model keeps a few dozen small graphs in one batch, and splits off a large outlier.
    cost = lambda g, m: squaring.bucket_cost(g, m, 4, 16, 16, 7, "tf32")  # noqa: E731
    assert len(choose_buckets([20 + i % 10 for i in range(64)], 4, cost)) == 1
    assert len(choose_buckets([20 + i % 10 for i in range(256)] + [500], 4, cost)) == 2


# Error of tf32 / bf16 products against the float64 inverse, float32 inputs. Measured by
# benchmarks/bench_squaring_precision.py (64 graphs of 8 to 64 nodes, H = 4, S = P = 16, 5 seeds;
# max |x - x_ref| / max |x_ref|), in units of the format's unit roundoff u (2^-11 tf32, 2^-8 bf16):
#   general graphs (rows of |A| sum to 0.9, k from the bound): y 4.9u (tf32) / 4.2u (bf16), gradients up to
#   11.5u / 9.5u (edge_weight; query, key, value up to 5.9u / 5.4u);
#   DAGs (exact k): y 1.5u / 1.5u, gradients up to 2.5u / 1.5u.
# The bounds below are twice the worst measured figure, rounded up: 10u / 24u and 4u / 6u.
# In float32 the squaring path is held to the flash-attention rule (DESIGN.md §6): at most twice the
# error of the exact path (dense, float32 inverse) at the same precision, plus float32's roundoff.
@pytest.mark.parametrize("kind", ["general", "dag"])
@pytest.mark.parametrize("precision", ["float32", "tf32", "bf16"])
def test_low_precision_error_against_the_float64_inverse(kind, precision):
    gen = torch.Generator().manual_seed(7)
    sizes = torch.randint(8, 33, (12,), generator=gen).tolist()
    q, k, v, edge_index, weight, batch = graph_batch(sizes, kind, heads=2, state=16, head_dim=16, seed=3,
                                                     edges_per_node=3)
    delta = torch.rand(batch.numel(), 2, generator=gen, dtype=torch.float64)
    if kind == "general":
        weight, _ = general_adjacency(delta, edge_index, torch.full_like(delta, 5.0), gamma=0.9)
        options = dict(gamma=0.9)
    else:
        weight, _ = dag_adjacency(delta, edge_index)
        options = dict(depth=int(topological_levels(edge_index, batch.numel()).max()))
    grad = torch.randn(q.size(0), 2, 16, generator=gen, dtype=torch.float64)
    exact = values_and_grads(lambda q_, k_, v_, w_: dense_resolvent_attention(q_, k_, v_, edge_index, w_, batch),
                             q, k, v, weight, grad)
    single = [t.float() for t in (q, k, v, weight, grad)]
    got = values_and_grads(lambda q_, k_, v_, w_: squaring_resolvent_attention(
        q_, k_, v_, edge_index, w_, batch, precision=precision, **options), *single)
    errors = [float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(got, exact)]
    if precision == "float32":
        dense32 = values_and_grads(lambda q_, k_, v_, w_: dense_resolvent_attention(q_, k_, v_, edge_index, w_,
                                                                                     batch), *single)
        reference = [float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(dense32, exact)]
        for error, ref in zip(errors, reference):
            assert error <= 2 * ref + 2.0 ** -24, (errors, reference)
        return
    u = DEFAULT_TOL[precision]
    y_bound, grad_bound = (10 * u, 24 * u) if kind == "general" else (4 * u, 6 * u)
    assert errors[0] <= y_bound, errors
    assert max(errors[1:]) <= grad_bound, errors
    assert errors[0] > u / 16  # the products were rounded (not silently float32)


def test_round_to_precision():
    one = torch.tensor([1.0])
    # tf32 keeps 10 explicit mantissa bits: 1 + 2^-10 stays, 1 + 2^-12 rounds down, the tie 1 + 2^-11 away from 0.
    for x, expected in ((1 + 2 ** -10, 1 + 2 ** -10), (1 + 2 ** -12, 1.0), (1 + 2 ** -11, 1 + 2 ** -10),
                        (-(1 + 2 ** -11), -(1 + 2 ** -10))):
        assert float(round_to_precision(one * x, "tf32")) == expected
    x = torch.randn(1000)
    assert torch.equal(round_to_precision(x, "bf16"), x.bfloat16().float())
    assert torch.equal(round_to_precision(x, "float32"), x)
    tf32 = round_to_precision(x, "tf32")
    assert torch.equal(tf32.view(torch.int32) & 0x1FFF, torch.zeros(1000, dtype=torch.int32))
    assert float(((tf32 - x) / x).abs().max()) <= 2.0 ** -11


def test_half_inputs_empty_inputs_and_single_graph():
    q, k, v, edge_index, weight, batch = graph_batch([6], "general", dtype=torch.float32)
    expected = squaring_resolvent_attention(q, k, v, edge_index, weight)  # batch=None: one graph
    torch.testing.assert_close(expected, squaring_resolvent_attention(q, k, v, edge_index, weight, batch))
    half = squaring_resolvent_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), edge_index, weight.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=0.05, rtol=0.05)
    empty = squaring_resolvent_attention(q[:0], k[:0], v[:0], edge_index[:, :0], weight[:0], num_squarings=2)
    assert empty.shape == (0, 2, 4)
    shared = squaring_resolvent_attention(q, k, v, edge_index, weight[:, 0])  # [E]: one weight for all heads
    torch.testing.assert_close(shared, squaring_resolvent_attention(q, k, v, edge_index,
                                                                    weight[:, :1].expand(-1, 2)))


def test_arguments_are_checked():
    q, k, v, edge_index, weight, batch = graph_batch([4, 5], "general")
    with pytest.raises(ValueError, match="precision: expected one of"):
        squaring_resolvent_attention(q, k, v, edge_index, weight, batch, precision="fp8")
    with pytest.raises(ValueError, match="num_squarings: expected a positive int"):
        squaring_resolvent_attention(q, k, v, edge_index, weight, batch, num_squarings=0)
    with pytest.raises(ValueError, match="max_nodes: expected at least the largest graph size 5"):
        squaring_resolvent_attention(q, k, v, edge_index, weight, batch, max_nodes=4)
    with pytest.raises(ValueError, match="num_graphs: expected more than"):
        squaring_resolvent_attention(q, k, v, edge_index, weight, batch, num_graphs=1, max_nodes=5)
    with pytest.raises(ValueError, match="gamma: expected a bound"):
        squaring_resolvent_attention(q, k, v, edge_index, weight, batch, gamma=1.0)
    with pytest.raises(ValueError, match="edge_weight: expected shape"):
        squaring_resolvent_attention(q, k, v, edge_index, weight[:, :1].repeat(1, 3), batch)
    with pytest.raises(ValueError, match="max_buckets: expected a positive int"):
        squaring_resolvent_attention(q, k, v, edge_index, weight, batch, max_buckets=0)
    with pytest.raises(ValueError, match="edge_index: an edge connects nodes of different graphs"):
        squaring_resolvent_attention(q, k, v, edge_index, weight, torch.arange(batch.numel()) % 2)
    if not squaring.fused_available(q.device):
        with pytest.raises(ValueError, match="fused: the Triton kernels need"):
            squaring_resolvent_attention(q, k, v, edge_index, weight, batch, fused=True)
