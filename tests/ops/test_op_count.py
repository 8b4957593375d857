"""Operations dispatched by one ``ChimeraConv`` step, forward and backward, on the ``bench_layer.py``
tree batch (issue 9, item 4): at most 300 with ``method="dense"`` and on the path ``auto`` takes on an
accelerator (``"squaring"``), and no more on a batch with twice as many distinct graph sizes. Counted
on CPU with a ``TorchDispatchMode``, as the issue counted 7,077 for the bucketed dense path (232 for
``GPSConv``). Both paths also give the inverse oracle's values and gradients through the layer."""
import importlib.util
import os

import pytest
import torch
from dispatch_count import CountOps

from torch_geometric_chimera import ChimeraConv
from torch_geometric_chimera.nn import chimera_conv
from torch_geometric_chimera.ops import GraphTopology, choose_method, common, resolvent, squaring
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention

_spec = importlib.util.spec_from_file_location(
    "bench_common", os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "common.py"))
bench_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_common)

MAX_OPS = 300
CHANNELS, HEADS, STATE_DIM = 64, 4, 16  # bench_layer.py's layer: expand 2, so P = 32


@pytest.fixture(scope="module")
def tree_batches():
    """bench_layer.py's tree batch (64 graphs, 46 distinct sizes), and one of twice as many distinct
    sizes in the same range (so the same largest graph: the padded size is the same)."""
    edge_index, batch, num_nodes = bench_common.peptide_like_batch(64)
    sizes = torch.bincount(batch)
    twice = list(range(int(sizes.max()) - 2 * len(set(sizes.tolist())) + 1, int(sizes.max()) + 1))
    return [(edge_index, batch, num_nodes), bench_common.peptide_like_batch(sizes=twice)]


def step_ops(method, edge_index, batch, num_nodes):
    torch.manual_seed(0)
    conv = ChimeraConv(CHANNELS, heads=HEADS, state_dim=STATE_DIM, method=method)
    x = torch.randn(num_nodes, CHANNELS)
    with torch.no_grad():
        conv(x, edge_index, batch=batch)  # the topology is computed and cached (once per graph batch)
    with CountOps() as counter:
        conv(x, edge_index, batch=batch).square().mean().backward()
    return counter.ops


#: On CPU, dense splits the tree batch into at most four padded batches (CPU_PADDING_WORK_LIMIT:
#: padded flops cost more than operations there), so its count is bounded by four batches' worth.
MAX_CPU_OPS = 600


@pytest.mark.parametrize("method, accelerator, path, one_batch", [
    ("dense", False, "dense", True),     # the padding policy of an accelerator: one padded batch
    ("auto", True, "squaring", True),    # the path auto takes on an accelerator
    ("dense", False, "dense", False),    # CPU's policy: at most four padded batches
])
def test_a_layer_step_dispatches_few_operations(tree_batches, monkeypatch, method, accelerator, path, one_batch):
    if accelerator:  # as on a GPU: nothing may be read on the host (the CPU value checks are off)
        monkeypatch.setattr(common, "host_reads_allowed", lambda t: False)
    if one_batch:  # (on CPU tensors the inverse stays CPU's: 32-row Gauss-Jordan blocks, not one LU call)
        monkeypatch.setattr(resolvent, "CPU_PADDING_WORK_LIMIT", squaring.PADDING_WORK_LIMIT)
    # Fresh tensors: the topology (and its padded batches) is cached per edge_index.
    tree_batches = [(e.clone(), b.clone(), n) for e, b, n in tree_batches]
    distinct = [len(set(torch.bincount(batch).tolist())) for _, batch, _ in tree_batches]
    assert distinct == [46, 92]
    counts = []
    for edge_index, batch, num_nodes in tree_batches:
        if method == "auto":  # ChimeraConv's general adjacency passes its gamma = 0.9
            topology = GraphTopology.get(edge_index, num_nodes, batch)
            assert choose_method(topology, None, STATE_DIM, 2 * CHANNELS // HEADS, gamma=0.9) == path
        ops = step_ops(method, edge_index, batch, num_nodes)
        # The path that ran: the dense inverse, or the squaring chain (8 squarings for gamma = 0.9).
        assert ("aten.linalg_inv_ex.default" in ops) == (path == "dense")
        assert ops["aten.baddbmm.default"] == (7 if path == "squaring" else 0)
        if accelerator:
            assert "aten._local_scalar_dense.default" not in ops  # no synchronization
        counts.append(sum(ops.values()))
    assert counts[0] <= (MAX_OPS if one_batch else MAX_CPU_OPS), counts
    assert counts[1] <= counts[0], counts  # the count does not grow with the number of distinct sizes


@pytest.mark.parametrize("method, accelerator", [("dense", False), ("squaring", False), ("auto", True)])
def test_the_layer_equals_the_inverse_oracle(monkeypatch, method, accelerator):
    # A few graphs of the same recipe, in float64: values and every parameter's gradient.
    edge_index, batch, num_nodes = bench_common.peptide_like_batch(5, mean_nodes=30, seed=3)
    torch.manual_seed(1)
    conv = ChimeraConv(16, heads=2, state_dim=4, method=method).double()
    x = torch.randn(num_nodes, 16, dtype=torch.float64)

    def step():
        conv.zero_grad()
        out = conv(x, edge_index, batch=batch)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), {name: p.grad.clone() for name, p in conv.named_parameters()}

    with monkeypatch.context() as patch:
        patch.setattr(chimera_conv, "resolvent_attention",
                      lambda q, k, v, ei, w, **kwargs: inverse_resolvent_attention(q, k, v, ei, w))
        expected, expected_grads = step()
    if accelerator:
        monkeypatch.setattr(common, "host_reads_allowed", lambda t: False)
        assert choose_method(GraphTopology.get(edge_index, num_nodes, batch), None, 4, 16, gamma=0.9) == "squaring"
    out, out_grads = step()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(out_grads[name], grad, rtol=1e-9, atol=1e-11, msg=name)
