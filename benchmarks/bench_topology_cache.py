"""What the topology cache's content check costs: a hit of ``GraphTopology.get`` on CPU compares
a kept copy of ``edge_index`` and ``batch`` with the tensors passed (so writes through ``.data``
or ``.numpy()``, which bypass the version counter, are seen). Timed against a hit that checks the
version counter only, and against one ChimeraConv forward + backward on the same batch.

    python benchmarks/bench_topology_cache.py --out benchmarks/results/topology_cache_cpu.json
"""
import argparse

import torch
from common import device_name, time_interleaved, write_json
from torch_geometric.utils import to_undirected

from torch_geometric_chimera import ChimeraConv
from torch_geometric_chimera.ops import common
from torch_geometric_chimera.ops.resolvent import GraphTopology


def rings_with_chords(num_graphs: int, n: int, chords: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    edges, batch = [], []
    for g in range(num_graphs):
        ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
        extra = torch.randint(0, n, (2, chords), generator=generator)
        edges.append(to_undirected(torch.cat([ring, extra[:, extra[0] != extra[1]]], 1), num_nodes=n) + g * n)
        batch.append(torch.full((n,), g, dtype=torch.long))
    return torch.cat(edges, 1), torch.cat(batch), num_graphs * n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/topology_cache.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for label, (edge_index, batch, n) in (("64 rings with chords, 150 nodes", rings_with_chords(64, 150, 15)),
                                          ("1 graph, 10^6 edges", (torch.randint(0, 10 ** 5, (2, 10 ** 6)),
                                                                   torch.zeros(10 ** 5, dtype=torch.long), 10 ** 5))):
        GraphTopology.get(edge_index, n, batch)  # cached

        def checked():
            GraphTopology.get(edge_index, n, batch)

        def version_only():
            original = common.host_reads_allowed
            common.host_reads_allowed = lambda t: False  # the accelerator rule: no content comparison
            try:
                GraphTopology.get(edge_index, n, batch)
            finally:
                common.host_reads_allowed = original
        timing = time_interleaved({"checked": checked, "version_only": version_only}, "cpu", reps=args.reps)
        row = {"graphs": label, "nodes": n, "edges": edge_index.size(1),
               "hit_checked_s": timing["checked"]["median_s"], "hit_version_only_s": timing["version_only"]["median_s"]}
        if n <= 10 ** 4:  # the default layer on the same batch, for scale
            conv = ChimeraConv(64, heads=4)
            x = torch.randn(n, 64)

            def layer():
                conv(x, edge_index, batch=batch).sum().backward()
            row["layer_fwd_bwd_s"] = time_interleaved({"layer": layer}, "cpu", warmup=1, reps=3)["layer"]["median_s"]
            row["check_share_of_layer_step"] = (row["hit_checked_s"] - row["hit_version_only_s"]) / row["layer_fwd_bwd_s"]
        rows.append(row)
        print(row, flush=True)
    write_json(args.out, {"device": device_name("cpu"), "rows": rows})


if __name__ == "__main__":
    main()
