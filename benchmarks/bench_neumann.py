"""Truncated Neumann series (method='neumann' state solve) against K torch.sparse.mm calls.

The baseline is the bare cost of the K sparse products the series needs: K calls of
torch.sparse.mm(A, X) with A as CSR and X of the same width. Forward only, in one process.

    python benchmarks/bench_neumann.py --out benchmarks/results/neumann_cpu.json
"""
import argparse

import torch
from common import compare, device_name, write_json
from torch_geometric.utils import to_undirected

from torch_geometric_chimera.ops import GraphTopology
from torch_geometric_chimera.ops.neumann import checkpointed_neumann


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20000)
    parser.add_argument("--degree", type=int, default=4)
    parser.add_argument("--width", type=int, default=256, help="S * P columns of the state")
    parser.add_argument("--terms", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/neumann.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.nodes
    edge_index = to_undirected(torch.randint(0, n, (2, n * args.degree // 2)), num_nodes=n)
    weight = torch.rand(edge_index.size(1)) / args.degree
    x = torch.randn(n, args.width)
    topology = GraphTopology(edge_index, n)
    operator = topology.operator
    terms = torch.tensor([args.terms])
    adj = torch.sparse_coo_tensor(edge_index.flip(0), weight, (n, n)).coalesce().to_sparse_csr()

    def chimera():
        with torch.no_grad():
            return checkpointed_neumann(operator, weight.unsqueeze(-1), x.unsqueeze(1), terms)

    def sparse_mm_calls():
        power = x
        for _ in range(args.terms):
            power = torch.sparse.mm(adj, power)
        return power

    def sparse_mm_series():  # the same series with torch.sparse.mm, for the correctness check
        out = power = x
        for _ in range(args.terms):
            power = torch.sparse.mm(adj, power)
            out = out + power
        return out

    torch.testing.assert_close(chimera().squeeze(1), sparse_mm_series(), rtol=1e-4, atol=1e-4)
    results = {"device": device_name("cpu"), "nodes": n, "edges": edge_index.size(1), "width": args.width,
               "terms": args.terms, "baseline": f"{args.terms} x torch.sparse.mm(A_csr, X)"}
    compare(results, "sparse_mm_calls", sparse_mm_calls, "chimera_neumann", chimera, reps=args.reps)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
