"""The Triton kernels of the grid path (ops/triton_grid.py) against the position-by-position
reference, the CPU op ``chimera::grid_attention`` and a dense inverse: forward and every gradient,
on the four walks of a batch of small images.

Without a GPU the kernels run in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` before
Triton is first imported; so :func:`test_kernels_in_the_interpreter` runs this file again in a
subprocess with the variable set (the pattern of test_triton_attention.py). test_triton_aot.py
compiles the kernels for sm_90 and sm_80 without running them.
"""
import pytest
import torch

pytest.importorskip("triton")

from triton_interpreter import kernel_device, run_in_interpreter  # noqa: E402
from triton_interpreter import needs_kernels as needs_kernels_when  # noqa: E402

from torch_geometric_chimera.nn.decomposition import batched_grid_dags  # noqa: E402
from torch_geometric_chimera.ops import grid  # noqa: E402
from torch_geometric_chimera.ops import triton_grid as tg  # noqa: E402

DEVICE = kernel_device(tg.INTERPRETED)
needs_kernels = needs_kernels_when(tg.INTERPRETED)


def test_kernels_in_the_interpreter():
    run_in_interpreter(__file__, tg.INTERPRETED)


@pytest.mark.skipif(tg.INTERPRETED, reason="runs a pytest subprocess of its own")
def test_a_failed_interpreter_run_shows_its_first_failure(tmp_path):
    """The assertion shows the first failure's traceback and the summary, however much output the
    later failures add (the last 4,000 characters alone hid the first error)."""
    test_file = tmp_path / "test_failing.py"
    test_file.write_text(
        "import pytest\n\n\n"
        "def descend(depth):\n"
        "    if depth == 0:\n"
        "        raise ValueError('the first failure')\n"
        "    descend(depth - 1)\n\n\n"
        "def test_first():\n"
        "    descend(60)\n\n\n"
        "@pytest.mark.parametrize('i', range(5))\n"
        "def test_later(i):\n"
        "    assert i < 0, 'a later failure ' + 'x' * 3000\n")
    with pytest.raises(AssertionError) as failure:
        run_in_interpreter(str(test_file), False)
    message = str(failure.value)
    assert "E   ValueError: the first failure" in message  # the traceback itself, not only its summary line
    assert "test_failing.py::test_later[4]" in message and "6 failed" in message
    assert len(message) < 14000


# Three images (2 x 3, 3 x 2, 1 x 4): a segment boundary inside the 3-row one, a single row, widths
# below the padded column tile of 4.
GRID_SIZE = torch.tensor([[2, 3], [3, 2], [1, 4]])
HEADS, STATE, HEAD_DIM = 2, 2, 4


def walks():
    return grid.grid_walks(GRID_SIZE, batched_grid_dags(GRID_SIZE))


def attention_inputs(num_nodes, dtype, seed=0):
    """``weight [N, 2, H]`` (nonzero everywhere, also where a position has no such parent), ``q, k, v``."""
    gen = torch.Generator().manual_seed(seed)
    weight = 0.5 * torch.randn(num_nodes, 2, HEADS, generator=gen, dtype=dtype)
    q = torch.randn(num_nodes, HEADS, STATE, generator=gen, dtype=dtype)
    k = torch.randn(num_nodes, HEADS, STATE, generator=gen, dtype=dtype)
    v = torch.randn(num_nodes, HEADS, HEAD_DIM, generator=gen, dtype=dtype)
    return [t.to(DEVICE) for t in (weight, q, k, v)]


def value_and_grads(fn, inputs, grad):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    return (y.detach(), *torch.autograd.grad(y, inputs, grad))


def tolerance(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_equals_the_reference_and_the_cpu_op(dtype):
    w = walks()
    graph_ptr, row_width = w.graph_ptr.to(DEVICE), w.row_width.to(DEVICE)
    inputs = attention_inputs(int(w.graph_ptr[-1]), dtype)
    grad = torch.randn(inputs[3].shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(DEVICE)
    # Default plan (2 rows per segment: one checkpoint row in the 3-row image), a checkpoint after
    # every row, no checkpoint at all, and the state split into 2 x 2 blocks (partial sums over s and f).
    # Every walk runs two of them in float64, one in float32 (the interpreter takes about a second per
    # forward and backward).
    plans = [tg.grid_plan(graph_ptr, row_width, STATE, HEAD_DIM, element_size=inputs[0].element_size()),
             tg.grid_plan(graph_ptr, row_width, STATE, HEAD_DIM, 1),
             tg.grid_plan(graph_ptr, row_width, STATE, HEAD_DIM, 3),
             tg.grid_plan(graph_ptr, row_width, STATE, HEAD_DIM, 2, block_s=1, block_p=2)]
    assert [p.num_checkpoints for p in plans] == [2, 3 + 2 * 2, 0, 2]
    assert (plans[0].block_s, plans[0].block_p) == (STATE, HEAD_DIM)
    for d, nodes in enumerate(w.nodes):
        nodes = nodes.to(DEVICE)
        expected = value_and_grads(
            lambda *t: grid.grid_attention_reference(graph_ptr, row_width, nodes, *t), inputs, grad)
        if grid.grid_available(inputs[1]):
            cpu = value_and_grads(lambda *t: grid.grid_attention(graph_ptr, row_width, nodes, *t), inputs, grad)
            for got, want in zip(cpu, expected):
                torch.testing.assert_close(got, want, **tolerance(dtype))
        chosen = [plans[d % 4], plans[(d + 1) % 4]] if dtype == torch.float64 else [plans[(d + 2) % 4]]
        for plan in chosen:
            got = value_and_grads(
                lambda *t: tg.grid_attention_triton(graph_ptr, row_width, nodes, *t, plan=plan), inputs, grad)
            for name, a, b in zip(("y", "weight", "query", "key", "value"), got, expected):
                torch.testing.assert_close(a, b, **tolerance(dtype), msg=lambda m: f"walk {d}, {plan}, {name}: {m}")
        # Missing parents: first row (slot 0) and first column (slot 1) of every image, zero gradient.
        position = torch.empty_like(nodes)
        position[nodes] = torch.arange(nodes.numel(), device=DEVICE)
        local = position - graph_ptr[:-1].repeat_interleave(graph_ptr.diff())
        width = row_width.repeat_interleave(graph_ptr.diff())
        assert (got[1][:, 0][local < width] == 0).all() and (got[1][:, 1][local % width == 0] == 0).all()


@needs_kernels
def test_attention_default_segments_empty_images_and_half_precision():
    # An empty image between two others, and a default call (its own plan).
    graph_ptr = torch.tensor([0, 6, 6, 10], device=DEVICE)
    row_width = torch.tensor([2, 5, 1], device=DEVICE)  # 3 x 2, empty, 4 x 1 (a chain)
    nodes = torch.tensor([1, 0, 3, 2, 5, 4, 9, 8, 7, 6], device=DEVICE)
    inputs = attention_inputs(10, torch.float64, seed=2)
    grad = torch.randn_like(inputs[3])
    got = value_and_grads(lambda *t: tg.grid_attention_triton(graph_ptr, row_width, nodes, *t), inputs, grad)
    expected = value_and_grads(lambda *t: grid.grid_attention_reference(graph_ptr, row_width, nodes, *t), inputs,
                               grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **tolerance(torch.float64))
    half = [t.to(torch.bfloat16) for t in inputs]
    y = tg.grid_attention_triton(graph_ptr, row_width, nodes, *half)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), grid.grid_attention_reference(graph_ptr, row_width, nodes,
                                                                         *[t.double() for t in half]),
                               rtol=2e-2, atol=2e-2)
    empty = [t[:0] for t in inputs]
    assert tg.grid_attention_triton(torch.zeros(1, dtype=torch.long, device=DEVICE),
                                    torch.zeros(0, dtype=torch.long, device=DEVICE),
                                    nodes[:0], *empty).shape == (0, HEADS, HEAD_DIM)


def dense_solve(graph_ptr, row_width, nodes, weight, x):
    """``(I - A)^{-1} x`` per head with ``A`` assembled from the weight table: an independent oracle."""
    n, heads = x.shape[:2]
    position = torch.empty_like(nodes)
    position[nodes] = torch.arange(n, device=nodes.device)
    start = graph_ptr[:-1].repeat_interleave(graph_ptr.diff())
    width = row_width.repeat_interleave(graph_ptr.diff())
    local = position - start
    adjacency = x.new_zeros(heads, n, n)
    for slot, has_parent, step in ((0, local >= width, width), (1, local % width > 0, torch.ones_like(width))):
        child = torch.nonzero(has_parent).flatten()
        parent = nodes[start[child] + local[child] - step[child]]
        adjacency[:, child, parent] = weight[child, slot].t()
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    return torch.linalg.solve(eye - adjacency, x.transpose(0, 1)).transpose(0, 1)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_solve_equals_the_dense_inverse(dtype):
    w = walks()
    graph_ptr, row_width = w.graph_ptr.to(DEVICE), w.row_width.to(DEVICE)
    gen = torch.Generator().manual_seed(3)
    n = int(w.graph_ptr[-1])
    weight = (0.5 * torch.randn(n, 2, HEADS, generator=gen, dtype=dtype)).to(DEVICE)
    x = torch.randn(n, HEADS, 5, generator=gen, dtype=dtype).to(DEVICE)
    grad = torch.randn(n, HEADS, 5, generator=gen, dtype=dtype).to(DEVICE)
    split = tg.grid_plan(graph_ptr, row_width, 1, 5, block_p=2)  # three blocks of features
    for d, nodes in enumerate(w.nodes):
        nodes = nodes.to(DEVICE)
        expected = value_and_grads(lambda *t: dense_solve(graph_ptr, row_width, nodes, *t), (weight, x), grad)
        reference = value_and_grads(lambda *t: tg.grid_solve_reference(graph_ptr, row_width, nodes, *t),
                                    (weight, x), grad)
        for plan in ((None, split) if dtype == torch.float64 else ((None, split)[d % 2],)):
            got = value_and_grads(lambda *t: tg.grid_solve_triton(graph_ptr, row_width, nodes, *t, plan=plan),
                                  (weight, x), grad)
            for a, b, c in zip(got, expected, reference):
                torch.testing.assert_close(a, b, **tolerance(dtype))
                torch.testing.assert_close(a, c, **tolerance(dtype))


@needs_kernels
def test_custom_ops_pass_opcheck_and_arguments_are_checked():
    """``torch.library.opcheck``: schema, autograd registration, fake kernels against the real ones,
    and AOT dispatch with dynamic shapes (which runs the backward ops through their fake kernels)."""
    w = walks()
    graph_ptr, row_width, nodes = w.graph_ptr.to(DEVICE), w.row_width.to(DEVICE), w.nodes[1].to(DEVICE)
    inputs = [t.requires_grad_() for t in attention_inputs(int(w.graph_ptr[-1]), torch.float32)]
    plan = tg.grid_plan(graph_ptr, row_width, STATE, HEAD_DIM)
    assert plan.num_checkpoints > 0
    torch.library.opcheck(torch.ops.chimera_triton.grid_attention.default,
                          (graph_ptr, row_width, nodes, *inputs, plan.segment_rows, plan.num_checkpoints,
                           plan.max_width, plan.block_s, plan.block_p))
    torch.library.opcheck(torch.ops.chimera_triton.grid_solve.default,
                          (graph_ptr, row_width, nodes, inputs[0], inputs[3], plan.max_width, 2))
    inputs = [t.detach() for t in inputs]
    with pytest.raises(ValueError, match="multiple of its positive row width"):
        tg.grid_plan(torch.tensor([0, 5]), torch.tensor([2]), STATE, HEAD_DIM)
    with pytest.raises(ValueError, match="cover the N = 15 nodes"):
        tg.grid_attention_triton(w.graph_ptr, w.row_width, w.nodes[0][:15], *[t[:15] for t in inputs])
    with pytest.raises(ValueError, match="expected shapes"):
        tg.grid_attention_triton(w.graph_ptr, w.row_width, w.nodes[0], *inputs[:3], inputs[3][:, :1])
    with pytest.raises(ValueError, match="power of two"):
        tg.grid_plan(w.graph_ptr, w.row_width, STATE, HEAD_DIM, block_p=3)


@pytest.mark.skipif(tg.INTERPRETED, reason="compiles the kernels themselves, not the interpreter's copies")
@needs_kernels
@pytest.mark.parametrize("transitions", ["positive", "signed"])
def test_grid_layer_on_the_triton_kernels_equals_the_dense_layer(transitions, monkeypatch):
    # The layer's GPU path (one Triton row-scan per grid DAG, per-direction weights and key scales of
    # decomposition_adjacency) against method="dense": values and every gradient, mixed image sizes.
    import torch_geometric_chimera.nn.decomposition as decomposition
    from torch_geometric_chimera import ChimeraConv
    monkeypatch.setattr(decomposition, "grid_available", lambda t: False)  # as on a GPU: no CPU kernel
    calls = []
    original = decomposition.grid_attention_triton
    monkeypatch.setattr(decomposition, "grid_attention_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    grid_size = torch.tensor([[3, 4], [1, 1], [2, 5]], device=DEVICE)
    n = int(grid_size.prod(-1).sum())
    triton_layer = ChimeraConv(8, heads=2, state_dim=4, decomposition="grid", transitions=transitions).to(DEVICE)
    dense_layer = ChimeraConv(8, heads=2, state_dim=4, decomposition="grid", method="dense",
                              transitions=transitions).to(DEVICE)
    if transitions == "signed":  # Delta around 1-3: transitions 2 exp(-Delta) - 1 of both signs
        with torch.no_grad():
            triton_layer.dt_bias.uniform_(0.5, 3.0)
    dense_layer.load_state_dict(triton_layer.state_dict())
    x = torch.randn(n, 8, device=DEVICE)
    results = []
    for layer in (triton_layer, dense_layer):
        leaf = x.clone().requires_grad_()
        out = layer(leaf, torch.empty(2, 0, dtype=torch.long, device=DEVICE), grid_size=grid_size)
        results.append([out] + list(torch.autograd.grad(out, [leaf] + list(layer.parameters()), torch.ones_like(out))))
    assert len(calls) == 4  # one per DAG, none for the dense layer
    names = ["out", "x"] + [name for name, _ in triton_layer.named_parameters()]
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_the_grid_axis_of_state_blocks_is_checked():
    """Grid axis 1 holds the ``S x P`` state blocks: at most 65,535 on CUDA, checked with an error that
    names the blocks (a launch past it fails with a bare CUDA error). (The kernels are compiled for
    sm_90 and sm_80 in test_triton_aot.py.)"""
    assert tg._launch_grid(6, 65535) == (6, 65535)
    with pytest.raises(ValueError, match="block_s, block_p: the state splits into 65536 blocks"):
        tg._launch_grid(6, 256 * 256)
