"""Canonical DAG decompositions (paper Figs. 2 and 3) built as the authors' image and text models:
direction-aware local convolution, selectivity per DAG and edge direction. Against a dense oracle
built independently from pixel coordinates, a pure-PyTorch Mamba-2 block, and each other."""
import math

import pytest
import torch
import torch.nn.functional as F

from torch_geometric_chimera.nn.decomposition import (DAG_SUM_SCALE, GRID_LIKE, NUM_DIRECTIONS, batched_grid_dags,
                                                      batched_line_dags, decomposed_resolvent_attention,
                                                      decomposition_adjacency, decomposition_conv_silu,
                                                      decomposition_conv_silu_reference, decomposition_dags,
                                                      decomposition_geometry, dt_groups, opaque_decomposition_mixer,
                                                      sharing_groups)
from torch_geometric_chimera.utils import grid_graph_dags, is_dag, line_graph_dags


def edge_set(edge_index):
    return set(map(tuple, edge_index.t().tolist()))


# --- geometry -------------------------------------------------------------------------------------

def test_batched_grid_dags_are_each_images_grid_dags_after_its_offset():
    sizes = [(2, 3), (1, 4), (3, 3), (1, 1)]
    dags = batched_grid_dags(torch.tensor(sizes))
    offset = 0
    expected = [set(), set(), set(), set()]
    for h, w in sizes:
        for d, dag in enumerate(grid_graph_dags(h, w)):
            expected[d] |= edge_set(dag + offset)
        offset += h * w
    assert [edge_set(dag) for dag in dags] == expected
    assert all(is_dag(dag, offset) for dag in dags)


def test_batched_line_dags_follow_the_sequence_lengths():
    seq_len = torch.tensor([3, 1, 4])
    batch = torch.repeat_interleave(torch.arange(3), seq_len)
    forward, backward = batched_line_dags(seq_len)
    ref_forward, ref_backward = line_graph_dags(8, batch)
    assert edge_set(forward) == edge_set(ref_forward) and edge_set(backward) == edge_set(ref_backward)
    # without seq_len, the batch vector gives the same sequences
    assert [edge_set(d) for d in decomposition_dags("line", 8, batch=batch)] == [edge_set(forward),
                                                                                 edge_set(backward)]
    assert [edge_set(d) for d in decomposition_dags("fwd", 8, seq_len=seq_len)] == [edge_set(forward)]


@pytest.mark.parametrize("call, message", [
    (lambda: decomposition_dags("grid", 4), "grid_size: decomposition='grid' needs"),
    (lambda: decomposition_dags("grid", 5, grid_size=torch.tensor([[2, 2]])),
     "grid_size: the graphs it describes have 4 nodes in all, but x has 5"),
    (lambda: decomposition_dags("line", 4, seq_len=torch.tensor([3])),
     "seq_len: the graphs it describes have 3 nodes in all, but x has 4"),
    (lambda: decomposition_dags("ring", 4), "decomposition: expected one of"),
    (lambda: decomposition_dags("cross_scan", 4), "grid_size: decomposition='cross_scan' needs"),
    (lambda: sharing_groups("grid", "columns"), "sharing: expected one of"),
    (lambda: dt_groups("grid", "row"), "share_dt: expected one of"),
    # sums and products that wrap around int64 (issue 19): each entry is checked first
    (lambda: decomposition_dags("line", 5, seq_len=torch.tensor([2 ** 62] * 4 + [5])), r"seq_len: every entry must"),
    (lambda: decomposition_dags("fwd", 5, seq_len=torch.tensor([2 ** 62] * 4 + [5])), r"seq_len: every entry must"),
    (lambda: decomposition_dags("grid", 4, grid_size=torch.tensor([[4, 2 ** 62 + 1]])), "grid_size: every entry"),
    (lambda: decomposition_dags("grid", 8, grid_size=torch.tensor([[2 ** 32, 2 ** 32], [2, 2]])),
     "grid_size: every entry"),
    (lambda: decomposition_dags("grid", 8, grid_size=torch.tensor([[4, 4], [2, 2]])), "height \\* width > N"),
    (lambda: decomposition_dags("line", 3, seq_len=torch.tensor([4, -1])), "seq_len: every entry"),
    (lambda: decomposition_dags("grid", 6, grid_size=torch.tensor([[2.0, 3.0]])), "grid_size: expected an integer"),
    (lambda: decomposition_dags("grid", 6, grid_size=torch.tensor([2, 3, 1])), "grid_size: expected an integer"),
    (lambda: decomposition_dags("line", 6, seq_len=torch.tensor([[6]])), "seq_len: expected an integer"),
    # a batch that disagrees with the geometry, or an unsorted one taken as sequences (issue 19)
    (lambda: decomposition_dags("grid", 10, grid_size=torch.tensor([[2, 3], [2, 2]]),
                                batch=torch.tensor([0] * 5 + [1] * 5)), "batch: disagrees with grid_size"),
    (lambda: decomposition_dags("line", 5, seq_len=torch.tensor([2, 3]), batch=torch.tensor([0, 0, 0, 1, 1])),
     "batch: disagrees with seq_len"),
    (lambda: decomposition_dags("line", 5, batch=torch.tensor([0, 1, 0, 1, 1])), "batch: decomposition='line'"),
])
def test_decomposition_geometry_is_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_geometry_agrees_with_a_batch_that_renames_its_graphs():
    # graph ids need not be 0..G-1: only which nodes belong together counts
    dags = decomposition_dags("grid", 10, grid_size=torch.tensor([[2, 3], [2, 2]]),
                              batch=torch.tensor([3] * 6 + [7] * 4))
    assert len(dags) == 4


def test_sharing_modes_group_the_grid_dags_as_documented():
    # DAG order: (down, right), (down, left), (up, right), (up, left)
    assert sharing_groups("grid", "none") == (0, 1, 2, 3)
    assert sharing_groups("grid", "complete") == (0, 0, 0, 0)
    assert sharing_groups("grid", "row") == (0, 0, 1, 1)            # same vertical direction
    assert sharing_groups("grid", "diagonal") == (0, 1, 1, 0)       # a DAG with its reverse
    assert dt_groups("grid", "diagonal") == (0, 1, 1, 0) and dt_groups("line", "diagonal") == (0, 0)
    dags = grid_graph_dags(3, 4)
    for d, e in [(0, 3), (1, 2)]:
        assert edge_set(dags[d]) == edge_set(dags[e].flip(0))


# --- the dense oracle, from coordinates -------------------------------------------------------------

def coordinates(decomposition, sizes):
    """(graph, row, column, height, width) of every node, in the batch's numbering (lines: row 0)."""
    out = []
    for g, size in enumerate(sizes):
        height, width = (size if decomposition in GRID_LIKE else (1, size))
        out += [(g, r, c, height, width) for r in range(height) for c in range(width)]
    return out


def oracle_parents(decomposition, sizes):
    """parents[d][i] = list of (j, slot): the parents of node i in DAG d, from the picture of Fig. 3."""
    nodes = coordinates(decomposition, sizes)
    index = {(g, r, c): i for i, (g, r, c, _, _) in enumerate(nodes)}
    if decomposition == "cross_scan":  # every scan: the node before in its order
        orders = []
        for g, (h, w) in enumerate(sizes):
            orders.append(([index[(g, r, c)] for r in range(h) for c in range(w)],
                           [index[(g, r, c)] for c in range(w) for r in range(h)]))
        parents = []
        for axis, reverse in [(0, False), (0, True), (1, False), (1, True)]:
            per_node = [[] for _ in nodes]
            for order in orders:
                walk = order[axis][::-1] if reverse else order[axis]
                for before, after in zip(walk[:-1], walk[1:]):
                    per_node[after].append((before, 0))
            parents.append(per_node)
        return parents
    if decomposition == "grid":
        flows = [(1, 1), (1, -1), (-1, 1), (-1, -1)]  # (vertical, horizontal) direction each DAG flows in
    else:
        flows = [(0, 1), (0, -1)][:2 if decomposition in ("line", "hydra") else 1]
    parents = []
    for dv, dh in flows:
        per_node = []
        for (g, r, c, _, _) in nodes:
            found = []
            if dv and (g, r - dv, c) in index:
                found.append((index[(g, r - dv, c)], 0))
            if (g, r, c - dh) in index:
                found.append((index[(g, r, c - dh)], 1 if decomposition == "grid" else 0))
            per_node.append(found)
        parents.append(per_node)
    return parents


def oracle_mixer(decomposition, sizes, query, key, value, delta, groups, delta_groups, signed=False, rate=None):
    """sum_d scale ((I - A_d)^-1 ⊙ C Bbar_d^T) V with A_d, Bbar_d written out entry by entry
    (transitions exp(-Delta), or 2 exp(-Delta) - 1 when signed)."""
    def gate(dt):
        return 2 * torch.exp(-dt) - 1 if signed else torch.exp(-dt)

    num_nodes, heads = value.shape[:2]
    out = torch.zeros_like(value)
    for d, dag_parents in enumerate(oracle_parents(decomposition, sizes)):
        for h in range(heads):
            adjacency = value.new_zeros(num_nodes, num_nodes)
            scale = value.new_zeros(num_nodes)
            for i, found in enumerate(dag_parents):
                dt = delta[i, delta_groups[d], :, h]  # [R]
                if decomposition == "grid":
                    norm = 1 / math.sqrt(max(len(found), 1))
                    for j, slot in found:
                        adjacency[i, j] = gate(dt[slot]) * norm
                    scale[i] = sum((dt[slot] for _, slot in found), value.new_zeros(())) * norm
                else:  # Mamba-2 per direction
                    for j, slot in found:
                        adjacency[i, j] = gate(dt[slot] * (1 if rate is None else rate[h]))
                    scale[i] = dt[0]
            resolvent = torch.linalg.inv(torch.eye(num_nodes, dtype=value.dtype) - adjacency)
            c = query[:, groups[d], min(h, query.size(2) - 1)]
            b = key[:, groups[d], min(h, key.size(2) - 1)] * scale.unsqueeze(-1)
            y = DAG_SUM_SCALE[decomposition] * (resolvent * (c @ b.t())) @ value[:, h]
            if decomposition == "hydra":  # each direction shifted by one: token i reads its parent's output
                y = torch.stack([y[found[0][0]] if found else torch.zeros_like(y[0]) for found in dag_parents])
            out[:, h] += y
    return out


CASES = [
    ("grid", [(3, 4), (2, 2), (1, 3)], "diagonal", "none"),
    ("grid", [(3, 4), (2, 2)], "none", "diagonal"),
    ("grid", [(2, 3), (4, 1), (0, 2)], "row", "none"),
    ("line", [5, 3, 1], "none", "none"),
    ("line", [4, 6], "complete", "diagonal"),
    ("fwd", [5, 3], "none", "none"),
    ("cross_scan", [(3, 4), (1, 3), (2, 1)], "none", "none"),
    ("hydra", [5, 3, 1], "none", "none"),
    ("cross_scan", [(2, 3), (3, 3)], "row", "diagonal"),
]


def random_problem(decomposition, sizes, sharing, share_dt, heads=2, state=3, head_dim=4, shared_heads=True,
                   delta_max=1.0):
    torch.manual_seed(0)
    key_name = "grid_size" if decomposition in GRID_LIKE else "seq_len"
    geometry_tensor = torch.tensor(sizes)
    num_nodes = int(geometry_tensor.prod(-1).sum()) if decomposition in GRID_LIKE else int(geometry_tensor.sum())
    groups, delta_groups = sharing_groups(decomposition, sharing), dt_groups(decomposition, share_dt)
    sets, dts, directions = max(groups) + 1, max(delta_groups) + 1, NUM_DIRECTIONS[decomposition]
    shape = (num_nodes, sets, 1 if shared_heads else heads, state)
    tensors = dict(query=torch.randn(shape, dtype=torch.float64), key=torch.randn(shape, dtype=torch.float64),
                   value=torch.randn(num_nodes, heads, head_dim, dtype=torch.float64),
                   delta=torch.rand(num_nodes, dts, directions, heads, dtype=torch.float64) * delta_max + 0.05)
    if decomposition != "grid":  # Mamba-2's decay rate per head on lines (ChimeraConv's exp(A_log))
        tensors["rate"] = torch.rand(heads, dtype=torch.float64) + 0.5
    for t in tensors.values():
        t.requires_grad_()
    return {key_name: geometry_tensor}, num_nodes, groups, delta_groups, tensors


def library_mixer(decomposition, geometry, num_nodes, groups, delta_groups, t, method="auto", signed=False):
    geo = decomposition_geometry(decomposition, num_nodes, **geometry)
    weight, key_scale = decomposition_adjacency(t["delta"], geo, delta_groups, DAG_SUM_SCALE[decomposition], signed,
                                                t.get("rate"))
    return decomposed_resolvent_attention(t["query"], t["key"], t["value"], weight, key_scale, geo, groups,
                                          method=method)


@pytest.mark.parametrize("signed", [False, True], ids=["positive", "signed"])
@pytest.mark.parametrize("decomposition, sizes, sharing, share_dt", CASES)
@pytest.mark.parametrize("method", ["auto", "dense", "dag"])
def test_decomposed_mixer_equals_the_dense_oracle(decomposition, sizes, sharing, share_dt, method, signed):
    # Signed: Delta up to 3, so that transitions 2 exp(-Delta) - 1 reach -0.9 (both signs occur).
    geometry, num_nodes, groups, delta_groups, t = random_problem(decomposition, sizes, sharing, share_dt,
                                                                  delta_max=3.0 if signed else 1.0)
    out = library_mixer(decomposition, geometry, num_nodes, groups, delta_groups, t, method, signed)
    expected = oracle_mixer(decomposition, sizes, t["query"], t["key"], t["value"], t["delta"], groups, delta_groups,
                            signed, t.get("rate"))
    torch.testing.assert_close(out, expected)
    assert expected.abs().max() > 0.1
    grad = torch.randn_like(out)
    names = [name for name in ("query", "key", "value", "delta", "rate") if name in t]
    got = torch.autograd.grad(out, [t[n] for n in names], grad)
    want = torch.autograd.grad(expected, [t[n] for n in names], grad)
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("signed", [False, True], ids=["positive", "signed"])
@pytest.mark.parametrize("decomposition, sizes, sharing, share_dt", [CASES[i] for i in (0, 1, 3, 5, 6, 8)])
def test_decomposed_mixer_gradcheck(decomposition, sizes, sharing, share_dt, signed):
    geometry, num_nodes, groups, delta_groups, t = random_problem(decomposition, sizes, sharing, share_dt,
                                                                  heads=1, state=2, head_dim=2,
                                                                  delta_max=3.0 if signed else 1.0)
    names = [name for name in ("query", "key", "value", "delta", "rate") if name in t]

    def f(*inputs):
        return library_mixer(decomposition, geometry, num_nodes, groups, delta_groups, dict(zip(names, inputs)),
                             signed=signed)
    assert torch.autograd.gradcheck(f, [t[n] for n in names])


def test_grid_decomposition_reaches_every_pair_of_pixels():
    # Figure 3: with positive weights the four DAGs' resolvents add up to L > 0 everywhere.
    sizes = [(4, 5)]
    geometry, num_nodes, groups, delta_groups, t = random_problem("grid", sizes, "none", "none", heads=1)
    geo = decomposition_geometry("grid", num_nodes, **geometry)
    weight, _ = decomposition_adjacency(t["delta"].detach(), geo, delta_groups)
    resolvents = []
    for d, (dag, slots) in enumerate(zip(geo.dags, geo.edge_slot)):
        adjacency = torch.zeros(num_nodes, num_nodes, dtype=torch.float64)
        adjacency[dag[1], dag[0]] = weight[d].reshape(-1)[slots]
        resolvents.append(torch.linalg.inv(torch.eye(num_nodes, dtype=torch.float64) - adjacency))
    assert bool((sum(resolvents) > 0).all())
    # no single DAG does: down-right never reaches a pixel above or to the left
    assert not any(bool((resolvent > 0).all()) for resolvent in resolvents)


# --- the local convolution ----------------------------------------------------------------------------

@pytest.mark.parametrize("decomposition, sizes, kernel", [
    ("grid", [(3, 4), (3, 4)], 3), ("grid", [(4, 4), (4, 4), (4, 4)], 5), ("line", [6, 6], 7), ("fwd", [5, 5], 4),
    ("cross_scan", [(2, 5), (2, 5)], 3),
])
def test_conv_of_equal_shapes_is_torch_conv_and_equals_the_gather(decomposition, sizes, kernel, monkeypatch):
    torch.manual_seed(0)
    key_name = "grid_size" if decomposition in GRID_LIKE else "seq_len"
    num_nodes = sum(h * w for h, w in sizes) if decomposition in GRID_LIKE else sum(sizes)
    geo = decomposition_geometry(decomposition, num_nodes, **{key_name: torch.tensor(sizes)})
    assert geo.uniform is not None
    channels = 5
    x = torch.randn(num_nodes, channels, dtype=torch.float64)
    weight = torch.randn(channels, *((kernel, kernel) if decomposition in GRID_LIKE else (kernel,)), dtype=torch.float64)
    bias = torch.randn(channels, dtype=torch.float64)
    out = decomposition_conv_silu(x, weight, bias, geo)  # the kernel, with the extension
    torch.testing.assert_close(out, decomposition_conv_silu_reference(x, weight, bias, geo))
    import torch_geometric_chimera.nn.decomposition as module
    monkeypatch.setattr(module, "block_kernels_available", lambda *args: False)  # as off CPU: torch's conv
    torch.testing.assert_close(decomposition_conv_silu(x, weight, bias, geo), out)
    # graph by graph with torch.nn's layers, as the authors' Conv2d / Conv1d (causal: Mamba-2's)
    for g, size in enumerate(sizes):
        if decomposition in GRID_LIKE:
            h, w = size
            layer = torch.nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels).double()
            layer.weight.data.copy_(weight.unsqueeze(1))
            layer.bias.data.copy_(bias)
            image = x[g * h * w:(g + 1) * h * w].t().reshape(1, channels, h, w)
            expected = layer(image).reshape(channels, h * w).t()
            rows = slice(g * h * w, (g + 1) * h * w)
        else:
            length = size
            pad = kernel - 1 if decomposition == "fwd" else kernel // 2
            layer = torch.nn.Conv1d(channels, channels, kernel, padding=pad, groups=channels).double()
            layer.weight.data.copy_(weight.unsqueeze(1))
            layer.bias.data.copy_(bias)
            expected = layer(x[g * length:(g + 1) * length].t().unsqueeze(0))[0, :, :length].t()
            rows = slice(g * length, (g + 1) * length)
        torch.testing.assert_close(out[rows], F.silu(expected))


# --- the layer ------------------------------------------------------------------------------------

from torch_geometric.loader import DataLoader  # noqa: E402

from torch_geometric_chimera import ChimeraConv  # noqa: E402
from torch_geometric_chimera.transforms import ImageToGrid, SequenceToLine  # noqa: E402

NO_EDGES = torch.empty(2, 0, dtype=torch.long)


def image_batch(sizes=((4, 4), (2, 6)), channels=8):
    return next(iter(DataLoader([ImageToGrid()(torch.randn(channels, h, w)) for h, w in sizes],
                                batch_size=len(sizes))))


def mamba2_block(conv, x):
    """A Mamba-2 block in plain PyTorch, token by token (one sequence ``x`` [T, channels]):
    in_proj, causal depthwise conv1d, SiLU, h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_tᵀ, y_t = C_tᵀ h_t + D x_t,
    RMSNorm(y ⊙ SiLU(z)) w, out_proj; parameters read from ``conv`` (a ChimeraConv(decomposition='fwd'))."""
    length = x.size(0)
    inner, state, heads, head_dim = conv.inner, conv.state_dim, conv.heads, conv.head_dim
    z, xbc, dt = (x @ conv.in_proj.weight.t()).split([inner, conv.conv_width, heads], -1)
    k = conv.conv_kernel
    padded = torch.cat([xbc.new_zeros(k - 1, xbc.size(1)), xbc])
    xbc = torch.stack([sum(conv.conv_weight[:, o] * padded[t + o] for o in range(k)) + conv.conv_bias
                       for t in range(length)])
    xbc = F.silu(xbc)
    values, B, C = xbc.split([inner, state, state], -1)
    values = values.view(length, heads, head_dim)
    delta = F.softplus(dt + conv.dt_bias)  # [T, H]
    A = -torch.exp(conv.A_log)  # Mamba-2's A < 0 per head
    h = x.new_zeros(heads, state, head_dim)
    ys = []
    for t in range(length):
        h = torch.exp(delta[t] * A).view(heads, 1, 1) * h + delta[t].view(heads, 1, 1) * B[t].view(1, state, 1) * values[t].view(heads, 1, head_dim)
        ys.append(torch.einsum("s,hsp->hp", C[t], h) + conv.D.view(heads, 1) * values[t])
    y = torch.stack(ys).reshape(length, inner) * F.silu(z)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * conv.norm_weight
    return y @ conv.out_proj.weight.t()


def test_fwd_decomposition_is_a_mamba2_block():
    torch.manual_seed(0)
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition="fwd")
    with torch.no_grad():  # away from the identity-like start, so every part matters
        conv.dt_bias.normal_()
        conv.A_log.normal_()
        conv.D.normal_()
        conv.norm_weight.normal_()
    seq_len = torch.tensor([9, 4])
    x = torch.randn(13, 8)
    out = conv(x, NO_EDGES, seq_len=seq_len)
    for rows in (slice(0, 9), slice(9, 13)):
        torch.testing.assert_close(out[rows], mamba2_block(conv, x[rows]), atol=1e-5, rtol=1e-5)


def test_fwd_decomposition_is_causal():
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition="fwd")
    x = torch.randn(7, 8)
    seq_len = torch.tensor([7])
    edge_index = SequenceToLine()(x).edge_index  # the undirected line: the layer must not use it
    out = conv(x, edge_index, seq_len=seq_len)
    x2 = x.clone()
    x2[5:] += 1.0
    out2 = conv(x2, edge_index, seq_len=seq_len)
    torch.testing.assert_close(out[:5], out2[:5])
    assert not torch.allclose(out[5:], out2[5:])


@pytest.mark.parametrize("symmetry", ["flip rows", "flip columns", "rotate 180", "transpose"])
@pytest.mark.parametrize("sharing", ["diagonal", "complete"])
def test_grid_layer_tells_an_image_from_its_mirror_images(symmetry, sharing):
    # A layer that sums the DAGs with shared, direction-blind weights is invariant under the 180°
    # rotation and the transpose; the direction-aware convolution and selectivity are not.
    torch.manual_seed(0)
    size = 5
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition="grid", sharing=sharing)
    image = torch.randn(size, size, 8)
    moved = {"flip rows": image.flip(0), "flip columns": image.flip(1), "rotate 180": image.flip(0, 1),
             "transpose": image.transpose(0, 1)}[symmetry]
    grid_size = torch.tensor([[size, size]])

    def run(img):
        return conv(img.reshape(-1, 8), NO_EDGES, grid_size=grid_size).reshape(size, size, 8)

    out, out_moved = run(image), run(moved)
    back = {"flip rows": out_moved.flip(0), "flip columns": out_moved.flip(1), "rotate 180": out_moved.flip(0, 1),
            "transpose": out_moved.transpose(0, 1)}[symmetry]
    assert (out - back).abs().max() > 1e-3 * out.abs().max()


@pytest.mark.parametrize("sharing", ["row", "diagonal", "none"])
def test_sharing_modes_with_equal_parameter_sets_equal_complete_sharing(sharing):
    data = image_batch()
    state, width = 4, 8
    complete = ChimeraConv(width, heads=2, state_dim=state, decomposition="grid", sharing="complete")
    shared = ChimeraConv(width, heads=2, state_dim=state, decomposition="grid", sharing=sharing)
    inner, sets = complete.inner, shared.num_sets
    assert sets == {"row": 2, "diagonal": 2, "none": 4}[sharing]

    def spread(t, before):  # rows: [..., x (before), B (state), C (state), rest]; copy B and C into every set
        head, b, c, rest = t.split([before, state, state, t.size(0) - before - 2 * state])
        return torch.cat([head] + [b] * sets + [c] * sets + [rest])

    state_dict = complete.state_dict()
    state_dict["in_proj.weight"] = spread(state_dict["in_proj.weight"], 2 * inner)  # z, x, B, C, dt
    for name in ("conv_weight", "conv_bias"):
        state_dict[name] = spread(state_dict[name], inner)  # x, B, C
    shared.load_state_dict(state_dict)
    args = (data.x, data.edge_index)
    kwargs = dict(batch=data.batch, grid_size=data.grid_size)
    torch.testing.assert_close(shared(*args, **kwargs), complete(*args, **kwargs))
    # and distinct sets give another layer
    with torch.no_grad():
        shared.in_proj.weight[2 * inner:2 * inner + state] += 0.5
    assert not torch.allclose(shared(*args, **kwargs), complete(*args, **kwargs))


def test_share_dt_diagonal_ties_a_dag_to_its_reverse():
    # share_dt="diagonal" equals share_dt="none" whose reverse DAGs got copies of the selectivity rows
    data = image_batch()
    tied = ChimeraConv(8, heads=2, state_dim=4, decomposition="grid", share_dt="diagonal")
    free = ChimeraConv(8, heads=2, state_dim=4, decomposition="grid", share_dt="none")
    assert tied.dt_width == 2 * 2 * 2 and free.dt_width == 4 * 2 * 2
    state_dict = tied.state_dict()
    head, dt = state_dict["in_proj.weight"].split([tied.inner + tied.conv_width, tied.dt_width])
    sets = dt.view(2, 2 * 2, -1)  # [Delta set, direction x head, channels]
    state_dict["in_proj.weight"] = torch.cat([head, sets[[0, 1, 1, 0]].reshape(-1, dt.size(-1))])
    free.load_state_dict(state_dict)
    kwargs = dict(batch=data.batch, grid_size=data.grid_size)
    torch.testing.assert_close(tied(data.x, NO_EDGES, **kwargs), free(data.x, NO_EDGES, **kwargs))


@pytest.mark.parametrize("decomposition", ["grid", "line", "fwd", "cross_scan", "hydra"])
def test_layer_on_a_batch_of_mixed_sizes_equals_each_graph_alone(decomposition):
    torch.manual_seed(0)
    if decomposition in GRID_LIKE:
        sizes, key = [(4, 4), (2, 6), (4, 4), (1, 1), (3, 2)], "grid_size"
        counts = [h * w for h, w in sizes]
    else:
        sizes, key = [9, 3, 9, 1], "seq_len"
        counts = sizes
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition=decomposition).double()
    x = torch.randn(sum(counts), 8, dtype=torch.float64, requires_grad=True)
    out = conv(x, NO_EDGES, **{key: torch.tensor(sizes)})
    start = 0
    for size, count in zip(sizes, counts):
        alone = conv(x[start:start + count], NO_EDGES, **{key: torch.tensor([size])})
        torch.testing.assert_close(out[start:start + count], alone)
        start += count
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.parameters())


def test_grid_layer_batches_images_like_one_by_one():
    data = image_batch()
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition="grid")
    out = conv(data.x, data.edge_index, batch=data.batch, grid_size=data.grid_size)
    for g in range(2):
        mask = data.batch == g
        single = conv(data.x[mask], NO_EDGES, grid_size=data.grid_size[g:g + 1])
        torch.testing.assert_close(out[mask], single)


@pytest.mark.parametrize("kwargs, message", [
    (dict(decomposition="ring"), "decomposition: expected one of"),
    (dict(decomposition="grid", adjacency="general"), "adjacency: decomposition='grid' normalizes every DAG"),
    (dict(decomposition="line", edge_dim=3), "edge_dim: the DAGs of a decomposition"),
    (dict(sharing="row"), "sharing: only applies with a decomposition"),
    (dict(share_dt="diagonal"), "share_dt: only applies with a decomposition"),
    (dict(conv_kernel=3), "conv_kernel: only applies with a decomposition"),
    (dict(decomposition="grid", sharing="rows"), "sharing: expected one of"),
    (dict(decomposition="grid", share_dt="row"), "share_dt: expected one of"),
    (dict(decomposition="grid", conv_kernel=4), "conv_kernel: expected a positive int, odd"),
    (dict(decomposition="line", conv_kernel=0), "conv_kernel: expected a positive int"),
])
def test_decomposition_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChimeraConv(8, **kwargs)


def test_layer_inputs_are_checked():
    data = image_batch()
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition="grid")
    with pytest.raises(ValueError, match="grid_size: decomposition='grid' needs"):
        conv(data.x, data.edge_index, batch=data.batch)
    with pytest.raises(ValueError, match="x: expected a floating tensor"):
        conv(data.x.long(), data.edge_index, grid_size=data.grid_size)
    with pytest.raises(ValueError, match="batch: disagrees with grid_size"):
        conv(data.x, data.edge_index, grid_size=data.grid_size, batch=data.batch.flip(0))


@pytest.mark.parametrize("decomposition, geometry, message", [
    # issue 19: these killed the process (an int64 sum or product that wraps, trusted by repeat_interleave)
    ("line", dict(seq_len=torch.tensor([2 ** 62] * 4 + [5])), "seq_len: every entry must lie in"),
    ("fwd", dict(seq_len=torch.tensor([2 ** 62] * 4 + [5])), "seq_len: every entry must lie in"),
    ("grid", dict(grid_size=torch.tensor([[2 ** 62, 4], [1, 5]])), "grid_size: every entry must lie in"),
    ("grid", dict(grid_size=torch.tensor([[5, 1], [3, 0]])), None),  # an empty image is fine
])
def test_layer_rejects_geometry_that_overflows(decomposition, geometry, message):
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition=decomposition)
    x = torch.randn(5, 8)
    if message is None:
        assert conv(x, NO_EDGES, **geometry).shape == (5, 8)
    else:
        with pytest.raises(ValueError, match=message):
            conv(x, NO_EDGES, **geometry)


def test_scripted_grid_layer_gives_the_eager_outputs():
    data = image_batch()
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition="grid")
    kwargs = dict(batch=data.batch, grid_size=data.grid_size)
    torch.testing.assert_close(torch.jit.script(conv)(data.x, data.edge_index, **kwargs),
                               conv(data.x, data.edge_index, **kwargs))


def test_one_sequence_without_seq_len_reuses_its_dags():
    first = decomposition_dags("line", 9)
    assert all(a is b for a, b in zip(first, decomposition_dags("line", 9)))
    assert [edge_set(d) for d in first] == [edge_set(d) for d in batched_line_dags(torch.tensor([9]))]


def test_dags_of_one_sequence_go_to_the_requested_device():
    # x's device, not the CPU: a layer on an accelerator builds its DAGs there
    for decomposition in ("line", "fwd"):
        dags = decomposition_dags(decomposition, 6, device=torch.device("meta"))
        assert len(dags) == (2 if decomposition == "line" else 1)
        assert all(dag.device.type == "meta" and dag.shape == (2, 5) for dag in dags)


@pytest.mark.parametrize("sharing", ["none", "complete", "row", "diagonal"])
def test_grid_kernel_path_equals_the_per_dag_path(sharing, monkeypatch):
    # method="auto" on CPU solves the four grid DAGs row by row in one chimera::grid_mixer call
    # (their walks stacked, the D skip added in the kernel), method="dense" inverts each DAG's I - A:
    # the same layer, values and gradients.
    import torch_geometric_chimera.nn.decomposition as decomposition
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2])  # the walk
        return grid_mixer(*args, **kwargs)

    grid_mixer = decomposition.grid_mixer
    monkeypatch.setattr(decomposition, "grid_mixer", counted)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # stacked from one image per thread up
    data = image_batch(sizes=((3, 4), (1, 1), (0, 3), (1, 5), (4, 1), (6, 2)), channels=16)
    grid = ChimeraConv(16, heads=2, state_dim=4, decomposition="grid", sharing=sharing).double()
    dense = ChimeraConv(16, heads=2, state_dim=4, decomposition="grid", sharing=sharing, method="dense").double()
    dense.load_state_dict(grid.state_dict())
    results = []
    for conv in (grid, dense):
        x = data.x.double().requires_grad_()
        out = conv(x, data.edge_index, batch=data.batch, grid_size=data.grid_size)
        grads = torch.autograd.grad(out, [x] + list(conv.parameters()), torch.ones_like(out))
        results.append((out,) + grads)
        assert len(calls) == 1 and calls[0].shape == (4, data.num_nodes)  # the four walks; no call for dense
    names = ["out", "x"] + [name for name, _ in grid.named_parameters()]
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    assert results[0][0].abs().max() > 0.01


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("decomposition", ["grid", "line", "hydra"])
def test_the_opaque_mixer_op_passes_opcheck_and_equals_the_eager_mixer(decomposition, signed):
    # chimera::decomposition_mixer, the layer's one node under torch.compile (its backward reruns the forward)
    from torch_geometric_chimera.nn.decomposition import decomposition_mixer
    torch.manual_seed(0)
    conv = ChimeraConv(8, heads=2, state_dim=3, decomposition=decomposition).double()
    geometry = (dict(grid_size=torch.tensor([[3, 4], [2, 2]])) if decomposition == "grid"
                else dict(seq_len=torch.tensor([5, 3])))
    n = 16 if decomposition == "grid" else 8
    xbc = torch.randn(n, conv.conv_width, dtype=torch.float64, requires_grad=True)
    dt = torch.randn(n, conv.dt_width, dtype=torch.float64, requires_grad=True)
    params = (conv.conv_weight.detach().clone().requires_grad_(), conv.conv_bias.detach().clone().requires_grad_(),
              conv.dt_bias.detach().clone().requires_grad_())
    A_log = None if conv.A_log is None else torch.randn_like(conv.A_log).requires_grad_()
    args = (xbc, dt) + params + (A_log, geometry.get("grid_size"), geometry.get("seq_len"), None, decomposition,
                                 list(conv.groups), list(conv.dt_groups), conv.heads, conv.state_dim, "auto", None, None,
                                 1000, signed)
    torch.library.opcheck(torch.ops.chimera.decomposition_mixer.default, args)
    got = torch.ops.chimera.decomposition_mixer(*args)
    want = decomposition_mixer(xbc, dt, *params, decomposition, geometry.get("grid_size"), geometry.get("seq_len"),
                               None, conv.groups, conv.dt_groups, conv.heads, conv.state_dim, signed=signed, A_log=A_log)
    grads = [torch.randn_like(t) for t in want]
    leaves = [xbc, dt, *params] + ([] if A_log is None else [A_log])
    for a, b in zip(torch.autograd.grad(got, leaves, grads), torch.autograd.grad(want, leaves, grads)):
        torch.testing.assert_close(a, b)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("decomposition", ["line", "grid"])
def test_the_opaque_mixer_fake_has_the_real_output_dtype_under_mixed_precision(decomposition):
    # Under autocast the features are bf16 and the parameters float32; the op computes in the promoted dtype,
    # and its fake (what torch.compile plans with) must say the same: a bf16 fake made Inductor give NaN.
    from torch._subclasses.fake_tensor import FakeTensorMode
    torch.manual_seed(0)
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition=decomposition)
    geometry = dict(grid_size=torch.tensor([[3, 4]])) if decomposition == "grid" else dict(seq_len=torch.tensor([5, 7]))
    xbc, dt = torch.randn(12, conv.conv_width).bfloat16(), torch.randn(12, conv.dt_width).bfloat16()
    params = [conv.conv_weight.detach(), conv.conv_bias.detach(), conv.dt_bias.detach(),
              None if conv.A_log is None else conv.A_log.detach()]
    args = [xbc, dt, *params, geometry.get("grid_size"), geometry.get("seq_len"), None, decomposition,
            list(conv.groups), list(conv.dt_groups), 2, 4, "auto", None, None, 1000, False]
    with FakeTensorMode() as mode:
        fake = torch.ops.chimera.decomposition_mixer(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                       for a in args])
    assert [t.dtype for t in fake] == [torch.float32, torch.float32]
    # The wrapper the compiled layer calls feeds the op one dtype: real and fake agree, gradients come back cast.
    leaves = [xbc.clone().requires_grad_(), dt.clone().requires_grad_()]
    y, values = opaque_decomposition_mixer(*leaves, *params[:3], decomposition, geometry.get("grid_size"),
                                           geometry.get("seq_len"), None, conv.groups, conv.dt_groups, 2, 4,
                                           A_log=params[3])
    assert y.dtype == values.dtype == torch.float32 and bool(torch.isfinite(y).all())
    grads = torch.autograd.grad(y.sum(), leaves)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize("decomposition", ["line", "fwd", "hydra", "cross_scan"])
def test_a_line_checkpoint_saved_before_the_decay_rate_loads_and_computes_as_before(decomposition):
    torch.manual_seed(0)
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition=decomposition)
    old = {name: value for name, value in conv.state_dict().items() if name != "A_log"}  # a checkpoint without it
    with torch.no_grad():
        conv.A_log.fill_(0.7)
    conv.load_state_dict(old)  # strict
    assert torch.equal(conv.A_log, torch.zeros_like(conv.A_log))  # rate 1: exp(-Delta), the old transitions
    wrapped = torch.nn.Sequential(conv)
    wrapped.load_state_dict({f"0.{name}": value for name, value in old.items()})  # under a prefix too
