"""Print the markdown table of a bench_layer.py JSON result, for BENCHMARKS.md.

    python benchmarks/render_table.py benchmarks/results/layer_cpu.json
"""
import json
import sys


def main(path):
    with open(path) as f:
        r = json.load(f)
    print(f"Device: {r['device']}; date: {r['date']}; torch {r['torch']}; command: `{r['command']}`\n")
    print(f"{r['num_graphs']} graphs, {r['num_nodes']} nodes, {r['num_edges']} directed edges; width "
          f"{r['channels']}, {r['heads']} heads, state size {r['state_dim']}.\n")
    print("| model | forward + backward (median) | ratio vs GPSConv | peak memory |")
    print("|---|---|---|---|")
    base = dict(r["gpsconv"], median_s=r["baseline_median_s"])

    def memory(entry):
        return f"{entry['peak_bytes'] / 2**20:.0f} MiB" if entry.get("peak_bytes") else "n/a (CPU)"
    print(f"| GPSConv (GCN + multihead attention), mean of the runs before and after | "
          f"{base['median_s'] * 1e3:.1f} ms | 1.00x | {memory(base)} |")
    for key, entry in r.items():
        if key.startswith("chimera_") and isinstance(entry, dict):
            _, method, expand = key.split("_")
            print(f"| ChimeraConv method={method}, {expand} | {entry['median_s'] * 1e3:.1f} ms | "
                  f"{entry['ratio_vs_gpsconv']:.2f}x | {memory(entry)} |")


if __name__ == "__main__":
    main(sys.argv[1])
