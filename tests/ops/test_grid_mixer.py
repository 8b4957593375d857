"""``chimera::grid_mixer`` (``csrc/cpu/grid_scan_cpu.cpp``): the stacked grid kernel on a layer's
features ``[values | keys | queries]`` read in place, plus Mamba's ``D`` skip, with one ``[N, C]``
gradient of the features. Against :func:`grid_mixer_reference` (the stacked
:func:`grid_attention_reference` plus the skip) and the stacked :func:`grid_attention` kernel:
values and gradients, gradcheck, op checks, malformed calls, and the layer's use of it."""
import pytest
import torch

import torch_geometric_chimera.nn.decomposition as decomposition
from torch_geometric_chimera.nn.decomposition import batched_grid_dags, decomposition_geometry, decomposition_mixer
from torch_geometric_chimera.ops.grid import grid_attention, grid_mixer, grid_mixer_reference, grid_walks

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.chimera, "grid_mixer"), reason="needs the compiled extension")

# A square-ish image, a pixel, a row, a column, an empty image, a tall one (several segments).
MIXED_SIZES = ((3, 4), (1, 1), (1, 5), (4, 1), (0, 3), (7, 2))


class MixerProblem:
    def __init__(self, sets=2, groups=(0, 1, 1, 0), heads=2, head_dim=4, state_dim=3, dtype=torch.float64, seed=0):
        torch.manual_seed(seed)
        self.grid_size = torch.tensor(MIXED_SIZES)
        walks = grid_walks(self.grid_size, batched_grid_dags(self.grid_size))
        self.index = (walks.graph_ptr, walks.row_width, torch.stack(walks.nodes)[:len(groups)])
        n = int(walks.graph_ptr[-1])
        self.groups, self.heads, self.state_dim = list(groups), heads, state_dim
        self.value_width = heads * head_dim
        self.table = (torch.rand(len(groups), n, 3, heads, dtype=dtype) - 0.5).requires_grad_()
        self.features = torch.randn(n, self.value_width + 2 * sets * state_dim, dtype=dtype, requires_grad=True)
        self.skip = torch.randn(heads, dtype=dtype, requires_grad=True)

    @property
    def leaves(self):
        return self.table, self.features, self.skip

    def args(self, table=None, features=None, skip=None):
        return (*self.index, self.table if table is None else table, self.features if features is None else features,
                self.skip if skip is None else skip, self.value_width, self.state_dim, self.groups)

    def kernel(self, *leaves, segment_rows=None):
        return grid_mixer(*self.args(*leaves), segment_rows)

    def reference(self, *leaves):
        return grid_mixer_reference(*self.args(*leaves))


def values_and_grads(out, leaves, grad):
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad))


@pytest.mark.parametrize("sets, groups", [(2, (0, 1, 1, 0)), (1, (0, 0, 0, 0)), (4, (0, 1, 2, 3)), (3, (2, 0, 2, 0))])
@pytest.mark.parametrize("segment_rows", [1, 2, None])
def test_kernel_equals_the_reference_values_and_gradients(sets, groups, segment_rows):
    problem = MixerProblem(sets, groups)
    out = problem.kernel(segment_rows=segment_rows)
    grad = torch.randn_like(out)
    got = values_and_grads(out, problem.leaves, grad)
    want = values_and_grads(problem.reference(), problem.leaves, grad)
    for name, a, b in zip(("y", "grad table", "grad features", "grad skip"), got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    if set(groups) != set(range(sets)):  # a key/query set no DAG reads: zero gradient
        unread = sorted(set(range(sets)) - set(groups))
        keys = got[2][:, problem.value_width:].view(-1, 2, sets, problem.state_dim)
        assert torch.equal(keys[:, :, unread], torch.zeros_like(keys[:, :, unread]))


def test_equals_the_stacked_attention_kernel_plus_the_skip():
    # The same numbers as chimera::grid_attention on the three column blocks, plus D v.
    problem = MixerProblem()
    n, sets, state_dim = problem.features.size(0), 2, problem.state_dim
    value, key, query = problem.features.split([problem.value_width, sets * state_dim, sets * state_dim], 1)
    attention = grid_attention(*problem.index, problem.table, query.view(n, sets, 1, state_dim),
                               key.view(n, sets, 1, state_dim), value.view(n, problem.heads, -1), groups=problem.groups)
    want = attention + problem.skip.view(1, -1, 1) * value.view(n, problem.heads, -1)
    grad = torch.randn_like(want)
    for a, b in zip(values_and_grads(problem.kernel(), problem.leaves, grad),
                    values_and_grads(want, problem.leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_float32_is_close_to_float64():
    wide, narrow = MixerProblem(), MixerProblem(dtype=torch.float32)
    leaves = [t.detach().float().requires_grad_() for t in wide.leaves]
    out32 = narrow.kernel(*leaves)
    out64 = wide.kernel()
    grad = torch.randn_like(out64)
    for a, b in zip(values_and_grads(out32, leaves, grad.float()), values_and_grads(out64, wide.leaves, grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_in_float32_and_returns_the_input_dtype(dtype):
    problem = MixerProblem(dtype=torch.float32)
    leaves = [t.detach().to(dtype) for t in problem.leaves]
    out = problem.kernel(*leaves)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), problem.kernel(*[t.float() for t in leaves]).detach().to(dtype).float())


def test_gradcheck():
    problem = MixerProblem(sets=2, groups=(0, 1, 1, 0), heads=2, head_dim=2, state_dim=2)
    assert torch.autograd.gradcheck(lambda *leaves: problem.kernel(*leaves, segment_rows=2), problem.leaves)


def test_opcheck():
    problem = MixerProblem()
    args = problem.args()
    out = torch.ops.chimera.grid_mixer(*args, 100, 0)
    torch.library.opcheck(torch.ops.chimera.grid_mixer.default, (*args, 100, 0))
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    grad = torch.randn_like(out[0])
    torch.library.opcheck(torch.ops.chimera.grid_mixer_backward.default,
                          (*detached[:6], out[1].detach(), grad, *detached[6:], 100, 0))


def test_no_dags_give_the_skip_alone():
    problem = MixerProblem(groups=())
    problem.index = problem.index[:2] + (problem.index[2][:0],)
    problem.table = problem.table.detach()[:0].requires_grad_()
    out = problem.kernel()
    grad = torch.randn_like(out)
    leaves = problem.leaves[1:]  # features, skip (the empty table gets an empty gradient)
    for a, b in zip(values_and_grads(out, leaves, grad), values_and_grads(problem.reference(), leaves, grad)):
        torch.testing.assert_close(a, b)
    value = problem.features.detach()[:, :problem.value_width].view(out.shape)
    torch.testing.assert_close(out, problem.skip.detach().view(1, -1, 1) * value)


@pytest.mark.parametrize("change, message", [
    (dict(value_width=7), "value_width must be a multiple of the H = 2 heads"),
    (dict(state_dim=5), "features must have C = value_width \\+ 2 \\* sets \\* state_dim"),
    (dict(skip=torch.zeros(3, dtype=torch.float64)), "skip must have shape \\[H\\] = \\[2\\]"),
    (dict(skip=torch.zeros(2)), "skip must have shape \\[H\\] = \\[2\\] and the dtype of features"),
    (dict(groups=[0, 1, 2, 0]), "groups\\[2\\] must be a set of query and key in \\[0, 2\\)"),
    (dict(state_dim=2 ** 62), "features must have C = value_width"),
    (dict(features=torch.zeros(36, 20, dtype=torch.bfloat16)), "features must be float32 or float64"),
    (dict(features=torch.zeros(5, 20, dtype=torch.float64)), "value must have|nodes must be"),
])
def test_malformed_calls_are_clean_errors(change, message):
    problem = MixerProblem()
    graph_ptr, row_width, nodes = problem.index
    args = dict(table=problem.table.detach(), features=problem.features.detach(), skip=problem.skip.detach(),
                value_width=problem.value_width, state_dim=problem.state_dim, groups=problem.groups)
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.chimera.grid_mixer(graph_ptr, row_width, nodes, args["table"], args["features"], args["skip"],
                                     args["value_width"], args["state_dim"], args["groups"], 100, 0)


def test_decomposition_mixer_adds_the_skip_in_the_kernel(monkeypatch):
    # With D, the stacked CPU path returns (y + D v, None): the same as without D plus the skip added
    # afterwards, values and gradients.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # stacked from one image per thread up
    torch.manual_seed(0)
    sizes = torch.tensor(MIXED_SIZES)
    n, heads, state_dim, inner = int(sizes.prod(-1).sum()), 2, 3, 8
    xbc = torch.randn(n, inner + 2 * 2 * state_dim, dtype=torch.float64, requires_grad=True)
    dt = torch.randn(n, 4 * 2 * heads, dtype=torch.float64, requires_grad=True)
    conv_weight = torch.randn(xbc.size(1), 3, 3, dtype=torch.float64, requires_grad=True)
    conv_bias = torch.randn(xbc.size(1), dtype=torch.float64, requires_grad=True)
    dt_bias, skip = (torch.randn(heads, dtype=torch.float64, requires_grad=True) for _ in range(2))
    args = (xbc, dt, conv_weight, conv_bias, dt_bias, "grid", sizes, None, None, (0, 1, 1, 0), (0, 1, 2, 3), heads,
            state_dim)
    fused, values = decomposition_mixer(*args, D=skip)
    assert values is None
    plain, values = decomposition_mixer(*args)
    want = plain + (skip.view(1, heads, 1) * values.view(n, heads, -1)).reshape(n, inner)
    leaves = (xbc, dt, conv_weight, conv_bias, dt_bias, skip)
    grad = torch.randn_like(want)
    got = torch.autograd.grad(fused, leaves, grad)
    expected = torch.autograd.grad(want, leaves, grad)
    torch.testing.assert_close(fused, want)
    for name, a, b in zip(("xbc", "dt", "conv_weight", "conv_bias", "dt_bias", "D"), got, expected):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    # Fewer images than threads: one call per DAG, the skip left to the norm, the same mixer.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    unfused, values = decomposition_mixer(*args, D=skip)
    assert values is not None
    assert decomposition.decomposition_geometry is decomposition_geometry
    torch.testing.assert_close(unfused + (skip.view(1, heads, 1) * values.view(n, heads, -1)).reshape(n, inner), fused)


THREADS_SCRIPT = """
import torch
from torch_geometric_chimera.nn.decomposition import batched_grid_dags
from torch_geometric_chimera.ops.grid import grid_mixer, grid_walks
torch.manual_seed(0)
# 40,000 one-pixel images and one head: the skip's [G, H] partial sums are long enough that a
# threaded reduction would split them; and some 32 x 32 images, each a task of its own.
for sizes, heads, head_dim in ((((1, 1),) * 40000, 1, 16), (((32, 32),) * 4 + ((7, 5),), 2, 5)):
    grid_size = torch.tensor(sizes)
    walks = grid_walks(grid_size, batched_grid_dags(grid_size))
    n = int(walks.graph_ptr[-1])
    table = torch.rand(4, n, 3, heads, dtype=torch.float64, requires_grad=True)
    features = torch.randn(n, heads * head_dim + 2 * 2 * 4, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(heads, dtype=torch.float64, requires_grad=True) * 1000
    grad = None
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = grid_mixer(walks.graph_ptr, walks.row_width, torch.stack(walks.nodes), table, features, skip,
                         heads * head_dim, 4, (0, 1, 1, 0))
        grad = torch.randn_like(out) if grad is None else grad
        results.append([out] + list(torch.autograd.grad(out, (table, features, skip), grad)))
    assert all(torch.equal(a, b) for a, b in zip(*results)), "results differ between 1 and 2 threads"
print("same")
"""


def test_result_does_not_depend_on_the_number_of_threads():
    # In a subprocess: torch.set_num_threads breaks torch 2.13's CPU batched LU for the rest of the
    # process (tests/ops/test_cpu_batched_lu.py). The skip's gradient sums the images' partial sums in
    # image order (at::sum splits long reductions over the threads).
    import subprocess
    import sys

    from worker_cases import subprocess_env
    result = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], capture_output=True, text=True, timeout=300,
                            env=subprocess_env())
    assert result.returncode == 0 and "same" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
