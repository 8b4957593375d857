"""chimera::dag_solve against MKL's sparse triangular solve (torch.triangular_solve on a CSR matrix).

The system is (I - A) H = X for the (down, right) DAG of a grid, whose natural node order is
topological, so I - A is lower triangular; X has S * P columns. Forward only (the sparse
triangular solve has no autograd).

    python benchmarks/bench_dag.py --out benchmarks/results/dag_cpu.json
"""
import argparse

import torch
from common import compare, device_name, write_json

from torch_geometric_chimera.ops import GraphTopology, dag_solve
from torch_geometric_chimera.utils import grid_graph_dags


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024, help="S * P columns of the state")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/dag.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.side * args.side
    edge_index = grid_graph_dags(args.side, args.side)[0]
    weight = 0.5 * torch.rand(edge_index.size(1))
    x = torch.randn(n, args.width)

    topology = GraphTopology(edge_index, n)
    level_ptr, order = topology.level_schedule
    csr = topology.operator
    csr_weight = weight[csr.perm].unsqueeze(-1)

    def chimera():
        return dag_solve(level_ptr, order, csr.rowptr, csr.col, csr_weight, x.unsqueeze(1))

    # I - A as a sparse CSR lower-triangular matrix (row = target).
    rows = torch.cat([edge_index[1], torch.arange(n)])
    cols = torch.cat([edge_index[0], torch.arange(n)])
    vals = torch.cat([-weight, torch.ones(n)])
    system = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n)).coalesce().to_sparse_csr()

    def mkl():
        return torch.triangular_solve(x, system, upper=False).solution

    torch.testing.assert_close(chimera().squeeze(1), mkl(), rtol=1e-4, atol=1e-4)
    results = {"device": device_name("cpu"), "grid": f"{args.side}x{args.side}", "width": args.width,
               "baseline": "torch.triangular_solve(X, I - A as sparse CSR)  (MKL)"}
    compare(results, "mkl_triangular_solve", mkl, "chimera_dag_solve", chimera, reps=args.reps)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
