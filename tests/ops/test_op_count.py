"""Operations dispatched by one ``ChimeraConv`` step, forward and backward, on the ``bench_layer.py``
tree batch (issue 9, item 4): at most 300 with ``method="dense"`` and on the path ``auto`` takes on an
accelerator (``"squaring"``), and no more on a batch with twice as many distinct graph sizes. Counted
on CPU with a ``TorchDispatchMode``, as the issue counted 7,077 for the bucketed dense path (232 for
``GPSConv``). Both paths also give the inverse oracle's values and gradients through the layer.

Issue 17, item 7: the same on the path a CUDA step really takes, kernel launches counted, on the
first call with a new batch (the topology computed in it): at most 200."""
import collections
import importlib.util
import os

import pytest
import torch
import triton
from dispatch_count import CountLaunches, CountOps, CountSyncs

from torch_geometric_chimera import ChimeraConv
from torch_geometric_chimera.nn import chimera_conv
from torch_geometric_chimera.ops import (GraphTopology, block, choose_method, common, resolvent, squaring,
                                         triton_attention)
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


#: Kernel launches of one ChimeraConv step on CUDA, topology included (issue 17, item 7).
MAX_CUDA_LAUNCHES = 200


class LaunchCounter:
    """Stands for a Triton kernel: ``kernel[grid](...)`` counts one launch and computes nothing."""

    def __init__(self, launches, name):
        self.launches, self.name = launches, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches["triton." + self.name] += 1
        return launch


@pytest.fixture
def cuda_path(monkeypatch):
    """The branches a CUDA step takes, on CPU tensors:

    * no value read on the host (``common.host_reads_allowed`` is False, as on any accelerator
      outside ``torch_geometric.debug()``): no CPU value checks, the accelerator's padding policy,
      ``auto`` taking ``"squaring"``, the topology read once;
    * the fused block kernels off (``block.block_kernels_available`` is False: they exist for CPU
      tensors only), so the local convolution and the gated RMSNorm run their PyTorch references;
    * ``(L ⊙ QKᵀ)V`` and its backward through :mod:`~.triton_attention`
      (``resolvent.fused_squaring_attention`` is True, as on CUDA with Triton), every Triton kernel
      of that module replaced by a :class:`LaunchCounter` (its outputs keep whatever they were
      allocated with: the counts do not depend on values once nothing is read on the host).

    Yields the counter of Triton launches."""
    launches = collections.Counter()
    monkeypatch.setattr(common, "host_reads_allowed", lambda t: False)
    monkeypatch.setattr(block, "block_kernels_available", lambda *tensors: False)
    monkeypatch.setattr(resolvent, "fused_squaring_attention", lambda device: True)
    kernels = [name for name, value in vars(triton_attention).items()
               if isinstance(value, triton.runtime.KernelInterface)]
    assert kernels  # the forward and the two backward kernels
    for name in kernels:
        monkeypatch.setattr(triton_attention, name, LaunchCounter(launches, name))
    return launches


def test_a_cuda_step_on_a_new_batch_launches_at_most_200_kernels(tree_batches, cuda_path):
    counts = []
    for edge_index, batch, num_nodes in tree_batches:
        # Fresh tensors: a new batch, its topology computed inside the counted step.
        edge_index, batch = edge_index.clone(), batch.clone()
        torch.manual_seed(0)
        conv = ChimeraConv(CHANNELS, heads=HEADS, state_dim=STATE_DIM)  # general adjacency: gamma = 0.9
        x = torch.randn(num_nodes, CHANNELS)
        cuda_path.clear()
        with CountLaunches() as counter, CountSyncs() as syncs:
            conv(x, edge_index, batch=batch).square().mean().backward()
        assert sum(syncs.syncs.values()) <= 1, dict(syncs.syncs)  # the topology's one read (item 5)
        assert sum(cuda_path.values()) >= 3  # the fused attention ran: one forward, two backward kernels
        ops = counter.launches
        assert ops["aten.baddbmm.default"] == 7  # the squaring chain ran (8 squarings for gamma = 0.9)
        assert "aten.bmm.default" in ops and "aten.mm.default" in ops
        counts.append(sum(ops.values()) + sum(cuda_path.values()))
    print(f"kernel launches of a CUDA step on a new batch (46, 92 distinct sizes): {counts}")
    assert counts[0] <= MAX_CUDA_LAUNCHES, counts
    assert counts[1] == counts[0], counts  # constant in the number of distinct sizes (46, then 92)
