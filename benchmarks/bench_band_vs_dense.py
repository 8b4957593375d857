"""The two exact small-graph paths, band and dense, on the mixer alone (forward + backward), next to
the times that ``method="auto"``'s cost model (``GraphTopology.path_costs``) estimates for them.

64 random trees with rings and 64 real peptides (RDKit), row-normalized weights as the
``general`` adjacency gives, four (H, S, P) shapes; band and dense timed interleaved.

    python benchmarks/bench_band_vs_dense.py --out benchmarks/results/band_vs_dense_cpu.json
"""
import argparse

import torch
from common import device_name, peptide_like_batch, real_peptide_batch, time_interleaved, write_json

from torch_geometric_chimera.nn.adjacency import general_adjacency
from torch_geometric_chimera.ops import choose_method, resolvent_attention
from torch_geometric_chimera.ops.resolvent import GraphTopology

SHAPES = [(4, 16, 16), (4, 16, 32), (2, 96, 32), (4, 64, 16)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/band_vs_dense.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for kind, (edge_index, batch, n) in (("random trees", peptide_like_batch(64)),
                                         ("real peptides", real_peptide_batch(64))):
        topology = GraphTopology(edge_index, n, batch)
        for heads, state, head_dim in SHAPES:
            q, k = torch.randn(n, heads, state), torch.randn(n, heads, state)
            v = torch.randn(n, heads, head_dim)
            w = general_adjacency(torch.rand(n, heads), edge_index, torch.zeros(n, heads))[0]
            for t in (q, k, v, w):
                t.requires_grad_()

            def run(method):
                def step():
                    out = resolvent_attention(q, k, v, edge_index, w, method=method, batch=batch, topology=topology)
                    out.sum().backward()
                return step
            timing = time_interleaved({"dense": run("dense"), "band": run("band")}, "cpu", warmup=1, reps=args.reps)
            dense_cost, band_cost = topology.exact_costs(state, head_dim)
            row = {"graphs": kind, "heads": heads, "S": state, "P": head_dim,
                   "dense_s": timing["dense"]["median_s"], "band_s": timing["band"]["median_s"],
                   # the model estimates seconds per head
                   "dense_est_s": dense_cost * heads, "band_est_s": band_cost * heads,
                   "auto": choose_method(topology, None, state, head_dim)}
            row["faster"] = "band" if row["band_s"] < row["dense_s"] else "dense"
            rows.append(row)
            print(row, flush=True)
    write_json(args.out, {"device": device_name("cpu"), "rows": rows})


if __name__ == "__main__":
    main()
