"""chimera::dag_solve against a baseline: MKL's sparse triangular solve on the CPU, a copy of the state on CUDA.

The system is (I - A) H = X for the (down, right) DAG of a grid, whose natural node order is
topological, so I - A is lower triangular; X has S * P columns. Forward only (the sparse
triangular solve has no autograd). The baselines:

- ``mkl``: ``torch.triangular_solve`` on ``I - A`` as a sparse CSR matrix (CPU only);
- ``copy``: ``X.clone()``, the memory traffic any solve needs at least (issue 9's target on a GPU:
  the solve at most 2x a copy of its state).

Either way the solve is checked against the sparse triangular solve on the CPU first.

    python benchmarks/bench_dag.py --out benchmarks/results/dag_cpu.json
    python benchmarks/bench_dag.py --device cuda --side 256 --out benchmarks/results/gpu/dag.json
"""
import argparse

import torch
from common import compare, device_name, write_json

from torch_geometric_chimera.ops import GraphTopology, dag_solve
from torch_geometric_chimera.utils import grid_graph_dags


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024, help="S * P columns of the state")
    parser.add_argument("--baseline", default="auto", choices=["auto", "mkl", "copy"],
                        help="auto: mkl on the CPU, copy elsewhere")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/dag.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    baseline = args.baseline if args.baseline != "auto" else "mkl" if device.type == "cpu" else "copy"
    if baseline == "mkl" and device.type != "cpu":
        parser.error(f"--baseline: mkl runs on the CPU only, got --device {args.device}")
    torch.manual_seed(0)
    n = args.side * args.side
    edge_index = grid_graph_dags(args.side, args.side)[0]
    weight = 0.5 * torch.rand(edge_index.size(1))
    x = torch.randn(n, args.width)

    # I - A as a sparse CSR lower-triangular matrix (row = target), on the CPU.
    rows = torch.cat([edge_index[1], torch.arange(n)])
    cols = torch.cat([edge_index[0], torch.arange(n)])
    vals = torch.cat([-weight, torch.ones(n)])
    system = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n)).coalesce().to_sparse_csr()

    def mkl():
        return torch.triangular_solve(x, system, upper=False).solution

    topology = GraphTopology(edge_index.to(device), n)
    level_ptr, order = topology.level_schedule
    csr = topology.operator
    csr_weight = weight.to(device)[csr.perm].unsqueeze(-1)
    state = x.to(device)

    def chimera():
        return dag_solve(level_ptr, order, csr.rowptr, csr.col, csr_weight, state.unsqueeze(1))

    def copy():
        return state.clone()

    torch.testing.assert_close(chimera().squeeze(1).cpu(), mkl(), rtol=1e-4, atol=1e-4)
    results = {"device": device_name(device), "grid": f"{args.side}x{args.side}", "width": args.width,
               "baseline": ("torch.triangular_solve(X, I - A as sparse CSR)  (MKL)" if baseline == "mkl" else
                            "X.clone(), a copy of the state")}
    if baseline == "mkl":
        compare(results, "mkl_triangular_solve", mkl, "chimera_dag_solve", chimera, reps=args.reps)
    else:
        compare(results, "state_copy", copy, "chimera_dag_solve", chimera, device=device, reps=args.reps)
    results["levels"] = level_ptr.numel() - 1
    write_json(args.out, results)


if __name__ == "__main__":
    main()
