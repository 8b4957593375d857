"""torch 2.13's CPU batched LU is wrong (or hangs) for larger matrices once torch.set_num_threads
has been called; the dense path must stay exact whatever the thread settings."""
import subprocess
import sys
import textwrap

import torch

from torch_geometric_chimera.ops.dense import CPU_BATCHED_LU_MAX_ROWS, batched_inverse

SCRIPT = textwrap.dedent("""
    import torch
    torch.set_num_threads(2)
    from torch_geometric_chimera.ops import resolvent_attention
    from torch_geometric_chimera.ops.reference import inverse_resolvent_attention
    torch.manual_seed(0)
    n, graphs, heads = 200, 3, 2
    edges = [torch.randint(0, n, (2, 3 * n)) + g * n for g in range(graphs)]
    edge_index = torch.cat(edges, 1)
    batch = torch.arange(graphs).repeat_interleave(n)
    N = n * graphs
    q, k = torch.randn(N, heads, 4, dtype=torch.float64), torch.randn(N, heads, 4, dtype=torch.float64)
    v = torch.randn(N, heads, 3, dtype=torch.float64)
    # not diagonally dominant: the dense path takes LU with pivoting
    w = torch.randn(edge_index.size(1), heads, dtype=torch.float64) * 0.4
    out = resolvent_attention(q, k, v, edge_index, w, method="dense", batch=batch)
    ref = inverse_resolvent_attention(q, k, v, edge_index, w)
    print("maxerr", float((out - ref).abs().max() / ref.abs().max()))
""")


def test_dense_path_is_exact_after_set_num_threads():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    error = float(result.stdout.split("maxerr")[-1])
    assert error < 1e-10, error


def test_batched_inverse_matches_one_by_one():
    torch.manual_seed(0)
    for n in (CPU_BATCHED_LU_MAX_ROWS, CPU_BATCHED_LU_MAX_ROWS + 1, 70):
        matrix = torch.eye(n, dtype=torch.float64) + 0.1 * torch.randn(2, 3, n, n, dtype=torch.float64)
        inverse = batched_inverse(matrix)
        assert inverse.shape == matrix.shape
        torch.testing.assert_close(inverse @ matrix, torch.eye(n, dtype=torch.float64).expand_as(matrix))
    assert batched_inverse(torch.empty(0, 40, 40)).shape == (0, 40, 40)
