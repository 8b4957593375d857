"""ChimeraConv forward + backward against PyG GPSConv on a batch of peptide-sized graphs.

GPSConv: GCN local model, multihead attention, width 64, 4 heads. ChimeraConv: width 64,
4 heads, state size 16. Both run in this process on the same batch; the figure of merit is the
time ratio Chimera / GPSConv. Three batches: random trees with rings (``--graphs-kind tree``, the
batch of the first measurements; sizes 100 to 200 nodes), the same trees all of 150 nodes
(``--graphs-kind uniform``) and real peptides built by RDKit (``--graphs-kind peptides``).

    python benchmarks/bench_layer.py --device cpu --out benchmarks/results/layer_cpu.json
    python benchmarks/bench_layer.py --device cpu --graphs-kind peptides --out benchmarks/results/layer_peptides_cpu.json

``--transitions positive,signed`` also times every configuration with signed transitions (issue 18),
interleaved with the positive layer of the same weights, and reports signed / positive:

    python benchmarks/bench_layer.py --methods auto,dense,band --transitions positive,signed \
        --out benchmarks/results/layer_signed_cpu.json
"""
import argparse

import torch
from common import (device_name, peptide_like_batch, real_peptide_batch, synchronize, time_interleaved, time_it,
                    write_json)
from torch_geometric.nn import GCNConv, GPSConv

from torch_geometric_chimera.nn import ChimeraConv


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--graphs", type=int, default=64)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--state-dim", type=int, default=16)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--slow-reps", type=int, default=2, help="reps for the neumann and iterative paths")
    parser.add_argument("--methods", default="auto,dense,band,neumann,iterative")
    parser.add_argument("--expands", default="1,2", help="comma list of ChimeraConv's expand (2 is the default)")
    parser.add_argument("--graphs-kind", default="tree", choices=["tree", "uniform", "peptides"],
                        help="tree: random trees with a few rings (bandwidth ~35); uniform: the same trees, all "
                             "of 150 nodes; peptides: real peptide molecules of LRGB's size built with RDKit "
                             "(chains, bandwidth ~5)")
    parser.add_argument("--transitions", default="positive", choices=["positive", "positive,signed"],
                        help="positive,signed: time the signed layer too, interleaved with the positive one")
    parser.add_argument("--out", default="benchmarks/results/layer.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.graphs_kind == "peptides":
        edge_index, batch, num_nodes = real_peptide_batch(args.graphs, device=device)
    else:
        edge_index, batch, num_nodes = peptide_like_batch(args.graphs, device=device,
                                                          same_size=args.graphs_kind == "uniform")
    x = torch.randn(num_nodes, args.channels, device=device)
    print(f"{args.graphs} graphs, {num_nodes} nodes, {edge_index.size(1)} directed edges on {device_name(device)}")

    def run(model, *inputs):
        def step():
            model.zero_grad(set_to_none=True)
            model(*inputs).square().mean().backward()
        return step

    def peak_memory(step):
        if device.type != "cuda":
            return None
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base

    gps = GPSConv(args.channels, GCNConv(args.channels, args.channels), heads=args.heads,
                  attn_type="multihead").to(device)
    gps_step = run(gps, x, edge_index, batch)
    results = {"device": device_name(device), "graphs_kind": args.graphs_kind, "num_graphs": args.graphs,
               "num_nodes": num_nodes,
               "num_edges": edge_index.size(1), "channels": args.channels, "heads": args.heads,
               "state_dim": args.state_dim, "baseline": "torch_geometric.nn.GPSConv(GCNConv, multihead)"}
    results["gpsconv"] = time_it(gps_step, device, reps=args.reps)
    results["gpsconv"]["peak_bytes"] = peak_memory(gps_step)
    print(f"GPSConv: {results['gpsconv']['median_s'] * 1e3:.1f} ms")
    for method in args.methods.split(","):
        for expand in (int(e) for e in args.expands.split(",")):
            chimera = ChimeraConv(args.channels, heads=args.heads, state_dim=args.state_dim, expand=expand,
                                  method=method).to(device)
            step = run(chimera, x, edge_index, None, batch)
            key = f"chimera_{method}_expand{expand}"
            reps = args.reps if method in ("auto", "dense", "band", "dag") else args.slow_reps
            if args.transitions == "positive":
                results[key] = time_it(step, device, warmup=min(3, reps), reps=reps)
            else:  # the same weights with signed transitions, timed round-robin with the positive layer
                signed = ChimeraConv(args.channels, heads=args.heads, state_dim=args.state_dim, expand=expand,
                                     method=method, transitions="signed").to(device)
                signed.load_state_dict(chimera.state_dict())
                timed = time_interleaved({"positive": step, "signed": run(signed, x, edge_index, None, batch)},
                                         device, warmup=min(3, reps), reps=reps)
                results[key] = timed["positive"]
                entry = dict(timed["signed"], ratio_vs_positive=timed["signed"]["median_s"] / timed["positive"]["median_s"])
                results.setdefault("signed", {})[f"{method}_expand{expand}"] = entry
                print(f"  signed transitions: {entry['median_s'] * 1e3:.1f} ms, {entry['ratio_vs_positive']:.3f}x the "
                      f"positive layer")
            results[key]["peak_bytes"] = peak_memory(step)
            print(f"ChimeraConv(method={method}, expand={expand}): {results[key]['median_s'] * 1e3:.1f} ms")
    # The 2-core machine drifts over minutes: time the baseline again at the end and compare every
    # configuration against the mean of both baseline runs.
    results["gpsconv_end"] = time_it(gps_step, device, reps=args.reps)
    baseline = (results["gpsconv"]["median_s"] + results["gpsconv_end"]["median_s"]) / 2
    results["baseline_median_s"] = baseline
    for key, entry in results.items():
        if key.startswith("chimera_"):
            entry["ratio_vs_gpsconv"] = entry["median_s"] / baseline
            print(f"{key}: {entry['ratio_vs_gpsconv']:.2f}x GPSConv")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
