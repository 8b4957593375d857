"""The mixer alone: ``resolvent_attention`` against the formulation of the paper's official code.

The official formulation pads the batch to dense tensors and inverts in float64:
``to_dense_adj`` of the edge weights, ``torch.inverse(I - A)`` in float64 per graph and head, then
``(L ⊙ Q Kᵀ) V`` as masked dense attention over the padded nodes (written here from that
description, for timing). Chimera's side is ``resolvent_attention`` with ``--method`` (default
``auto``) on the same inputs. Forward + backward (gradients of query, key, value and the edge
weights), timed interleaved in this process after checking that both give the same output.

The batch is that of ``bench_layer.py``: 64 peptide-like trees with rings of 100 to 200 nodes
(``--graphs-kind tree``, 46 distinct sizes) or all of 150 nodes (``--graphs-kind uniform``); the
sizes H = 4, S = 16, P = 32 are those of ``ChimeraConv(64)`` (expand 2). Edge weights follow the
``general`` normalization (positive, every row sums to less than 0.9).

    python benchmarks/bench_mixer.py --device cuda --graphs-kind tree --out mixer_tree.json
"""
import argparse

import torch
from common import compare, device_name, peptide_like_batch, write_json
from torch_geometric.utils import scatter, to_dense_adj, to_dense_batch

from torch_geometric_chimera.ops import resolvent_attention


def official_mixer(query, key, value, edge_index, edge_weight, batch):
    """``(L ⊙ Q Kᵀ) V`` with ``L = (I - A)⁻¹`` by padded dense tensors, a float64 inverse and
    masked attention; ``A[i, j]`` is the weight of edge ``j -> i``. Returns ``[N, H, P]``."""
    # to_dense_adj puts the weight of edge (j -> i) at [graph, j, i, head]; A wants [graph, head, i, j].
    adj = to_dense_adj(edge_index, batch, edge_attr=edge_weight).permute(0, 3, 2, 1)
    eye = torch.eye(adj.size(-1), dtype=torch.float64, device=adj.device)
    resolvent = torch.inverse(eye - adj.double()).to(query.dtype)  # [B, H, M, M]
    q, mask = to_dense_batch(query, batch)  # [B, M, H, S], [B, M]
    k, _ = to_dense_batch(key, batch)
    v, _ = to_dense_batch(value, batch)
    scores = torch.einsum("bihs,bjhs->bhij", q, k) * resolvent
    scores = scores.masked_fill(~(mask[:, None, :, None] & mask[:, None, None, :]), 0.0)
    return torch.einsum("bhij,bjhp->bihp", scores, v)[mask]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--graphs", type=int, default=64)
    parser.add_argument("--graphs-kind", default="tree", choices=["tree", "uniform"],
                        help="tree: 100 to 200 nodes per graph; uniform: all of 150 nodes")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--state-dim", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--method", default="auto", help="resolvent_attention's method")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/mixer.json")
    args = parser.parse_args()
    if args.graphs < 1:
        parser.error(f"--graphs: expected a positive number of graphs, got {args.graphs}")
    torch.manual_seed(0)
    device = torch.device(args.device)
    edge_index, batch, num_nodes = peptide_like_batch(args.graphs, device=device,
                                                      same_size=args.graphs_kind == "uniform")
    H, S, P = args.heads, args.state_dim, args.head_dim
    query = torch.randn(num_nodes, H, S, device=device, requires_grad=True)
    key = torch.randn(num_nodes, H, S, device=device, requires_grad=True)
    value = torch.randn(num_nodes, H, P, device=device, requires_grad=True)
    raw = torch.rand(edge_index.size(1), H, device=device)
    in_weight = scatter(raw, edge_index[1], 0, dim_size=num_nodes, reduce="sum")
    edge_weight = (0.9 * raw / (in_weight[edge_index[1]] + 1.0)).requires_grad_()
    inputs = (query, key, value)

    def chimera():
        return resolvent_attention(query, key, value, edge_index, edge_weight, method=args.method, batch=batch)

    def official():
        return official_mixer(query, key, value, edge_index, edge_weight, batch)

    with torch.no_grad():
        torch.testing.assert_close(chimera(), official(), rtol=1e-3, atol=1e-4)

    def step(fn):
        def run():
            for t in (*inputs, edge_weight):
                t.grad = None
            fn().square().mean().backward()
        return run

    sizes = torch.bincount(batch)
    results = {"device": device_name(device), "graphs_kind": args.graphs_kind, "num_graphs": args.graphs,
               "num_nodes": num_nodes, "num_edges": edge_index.size(1),
               "distinct_sizes": int(torch.unique(sizes).numel()), "heads": H, "state_dim": S, "head_dim": P,
               "method": args.method,
               "baseline": "official formulation: to_dense_adj, float64 torch.inverse, masked dense attention"}
    compare(results, "official", step(official), "chimera", step(chimera), device=device, reps=args.reps)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
