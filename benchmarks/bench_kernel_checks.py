"""What the index-value checks of the raw ops cost on CPU, against the kernels they guard.

Every raw op checks its index arguments (rowptr, level_ptr, order, node_ptr, bandwidth) before
it reads through them. For each op on a 64-graph peptide-like batch (about 9,600 nodes and 19,000
edges), this times the op on real features ("full") and the same call with zero heads, which
returns right after the checks ("checks"): the second is an upper bound of the checks' cost (it
also holds the dispatch, the shape checks and the output allocation). Timed interleaved.

    python benchmarks/bench_kernel_checks.py --out benchmarks/results/kernel_checks_cpu.json

``--label`` stores the run under that key of the JSON (default "after"), so that a build without
the checks can be timed into the same file, e.g. ``--label before`` with PYTHONPATH pointing at
such a build.
"""
import argparse
import json
import os

import torch
from common import device_name, peptide_like_batch, time_interleaved, write_json

from torch_geometric_chimera.ops import GraphTopology

ops = torch.ops.chimera


def cases(heads: int, feat: int):
    """name -> (full call, checks-only call)."""
    edge_index, batch, n = peptide_like_batch(64)
    topology = GraphTopology(edge_index, n, batch)
    csr = topology.operator
    e = csr.col.numel()
    rowptr, col = csr.rowptr, csr.col

    made = {}

    def features(h, f, rows=n):  # made once: the timed calls are the ops alone
        if (h, f, rows) not in made:
            made[h, f, rows] = torch.randn(rows, h, f)
        return made[h, f, rows]

    # a DAG on the same nodes: every edge from the lower index to the higher one
    src, dst = edge_index
    dag = GraphTopology(edge_index[:, src < dst], n)
    level_ptr, order = dag.level_schedule
    d_rowptr, d_col = dag.operator.rowptr, dag.operator.col
    d_e = d_col.numel()
    s = topology.band_schedule
    w_band = 0.4 / 4 * torch.rand(e, heads)  # rows of |A| sum below 1: the band path's regime
    factors = ops.band_factor(s.node_ptr, s.order, s.bandwidth, rowptr, col, w_band, s.band_size)
    factors0 = factors[:, :0]
    w_dag = 0.3 * torch.rand(d_e, heads)
    out = {}
    out["spmm"] = (lambda: ops.spmm(rowptr, col, w_band, features(heads, feat)),
                   lambda: ops.spmm(rowptr, col, w_band[:, :0], features(0, feat)))
    out["edge_dot"] = (lambda: ops.edge_dot(rowptr, col, features(heads, feat), features(heads, feat)),
                       lambda: ops.edge_dot(rowptr, col, features(0, feat), features(0, feat)))
    out["dag_solve"] = (lambda: ops.dag_solve(level_ptr, order, d_rowptr, d_col, w_dag,
                                              features(heads, feat)),
                        lambda: ops.dag_solve(level_ptr, order, d_rowptr, d_col, w_dag[:, :0], features(0, feat)))
    out["dag_attention"] = (lambda: ops.dag_attention(level_ptr, order, d_rowptr, d_col, w_dag,
                                                      features(heads, feat), features(heads, feat),
                                                      features(heads, feat)),
                            lambda: ops.dag_attention(level_ptr, order, d_rowptr, d_col, w_dag[:, :0],
                                                      features(0, feat), features(0, feat), features(0, feat)))
    out["band_factor"] = (lambda: ops.band_factor(s.node_ptr, s.order, s.bandwidth, rowptr, col, w_band, s.band_size),
                          lambda: ops.band_factor(s.node_ptr, s.order, s.bandwidth, rowptr, col, w_band[:, :0],
                                                  s.band_size))
    out["band_solve"] = (lambda: ops.band_solve(s.node_ptr, s.order, s.bandwidth, factors, features(heads, feat)),
                         lambda: ops.band_solve(s.node_ptr, s.order, s.bandwidth, factors0, features(0, feat)))
    out["band_attention"] = (lambda: ops.band_attention(s.node_ptr, s.order, s.bandwidth, factors,
                                                        features(heads, feat), features(heads, feat),
                                                        features(heads, feat)),
                             lambda: ops.band_attention(s.node_ptr, s.order, s.bandwidth, factors0, features(0, feat),
                                                        features(0, feat), features(0, feat)))
    return out, {"nodes": n, "edges": e, "dag_edges": d_e, "graphs": int(s.node_ptr.numel() - 1),
                 "max_bandwidth": int(s.bandwidth.max())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--feat", type=int, default=16)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--label", default="after")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/kernel_checks_cpu.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    calls, sizes = cases(args.heads, args.feat)
    rows = []
    for name, (full, checks) in calls.items():
        timing = time_interleaved({"full": full, "checks": checks}, "cpu", warmup=2, reps=args.reps)
        row = {"op": name, "full_ms": timing["full"]["median_s"] * 1e3, "checks_ms": timing["checks"]["median_s"] * 1e3}
        row["checks_percent_of_full"] = 100 * row["checks_ms"] / row["full_ms"]
        rows.append(row)
        print(f"{name:16s} full {row['full_ms']:8.3f} ms   checks-only call {row['checks_ms']:7.3f} ms   "
              f"{row['checks_percent_of_full']:5.1f} %")
    payload = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            payload = json.load(f)
        for key in ("date", "command", "torch"):
            payload.pop(key, None)
    payload.update({"device": device_name("cpu").split(",")[0], "heads": args.heads, "feat": args.feat, **sizes})
    payload[args.label] = {"threads": torch.get_num_threads(), "ops": rows}
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
