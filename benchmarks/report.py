"""Write BENCHMARKS.md from the JSON results in benchmarks/results/.

    python benchmarks/report.py
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def load(name):
    path = os.path.join(RESULTS, name)
    return json.load(open(path)) if os.path.exists(path) else None


def ms(entry):
    return f"{entry['median_s'] * 1e3:.1f} ms"


def header(r):
    return f"Device: {r['device']}; date: {r['date']}; torch {r['torch']}; command: `{r['command']}`"


def layer_section(r):
    def memory(entry):
        return f"{entry['peak_bytes'] / 2**20:.0f} MiB" if entry.get("peak_bytes") else "n/a (CPU)"
    lines = ["## ChimeraConv vs PyG GPSConv (issues 2 and 3)", "",
             "`python benchmarks/bench_layer.py --device cpu --out benchmarks/results/layer_cpu.json`", "",
             header(r), "",
             f"{r['num_graphs']} peptide-sized graphs, {r['num_nodes']} nodes, {r['num_edges']} directed edges; "
             f"width {r['channels']}, {r['heads']} heads, state size {r['state_dim']}; forward + backward.", "",
             "| model | time (median) | ratio vs GPSConv | peak memory |", "|---|---|---|---|",
             f"| GPSConv (GCN + multihead attention), mean of the runs before and after | "
             f"{r['baseline_median_s'] * 1e3:.1f} ms | 1.00x | {memory(r['gpsconv'])} |"]
    for key, entry in r.items():
        if key.startswith("chimera_") and isinstance(entry, dict):
            _, method, expand = key.split("_")
            lines.append(f"| ChimeraConv method={method}, {expand} | {ms(entry)} | {entry['ratio_vs_gpsconv']:.2f}x | "
                         f"{memory(entry)} |")
    lines += ["", "- `auto` takes the exact `dense` path here (every graph has at most 768 nodes): one batched "
              "inverse per bucket of similar graph sizes, by Schur-complement block elimination (batched "
              "matrix products; `I - A` is strictly diagonally dominant under the `general` adjacency), and a "
              "backward that reads the resolvent gradient at the edges only.",
              "- DESIGN.md measured a naive dense resolvent at 8x GPSConv and a naive `index_add` Neumann series "
              "(K = 16) at 58x on this machine. Target (issue 3): <= 1.0x; not reached on CPU.",
              "- The `neumann` rows use each graph's diameter bound (up to about 60 terms here) on the state "
              "form (`N x H x S x P`), and `iterative` solves to 1e-6; on small graphs both lose to `dense`, "
              "which is why `auto` does not pick them there.",
              "- Peak memory is only measured on CUDA (`torch.cuda.max_memory_allocated`)."]
    return lines


def line_section(r):
    return ["## Line path vs chunked SSD (issue 3)", "",
            "`python benchmarks/bench_line.py --out benchmarks/results/line_cpu.json`", "", header(r), "",
            f"One sequence, T = {r['T']}, {r['heads']} heads, S = {r['state']}, P = {r['head_dim']}, forward + "
            "backward; line and SSD timed interleaved.", "",
            "| path | time (median) | ratio |", "|---|---|---|",
            f"| pure-PyTorch chunked SSD, chunk 64 (baseline) | {ms(r['chunked_ssd'])} | 1.00x |",
            f"| `method=\"line\"` (chunk 64) | {ms(r['line'])} | **{r['line_vs_ssd']:.2f}x** (target <= 1.5x) |",
            f"| `method=\"dag\"` (generic level-by-level `chimera::dag_solve`) | {ms(r['dag'])} | line is "
            f"**{r['dag_vs_line_speedup']:.0f}x faster** (target >= 10x) |"]


def dag_section(r):
    return ["## DAG solve vs MKL sparse triangular solve (issue 3)", "",
            "`python benchmarks/bench_dag.py --out benchmarks/results/dag_cpu.json`", "", header(r), "",
            f"(down, right) DAG of a {r['grid']} grid, X with {r['width']} columns (S * P), forward, interleaved.", "",
            "| solver | time (median) | ratio |", "|---|---|---|",
            f"| `torch.triangular_solve` on `I - A` as sparse CSR (MKL, baseline) | {ms(r['mkl_triangular_solve'])} | 1.00x |",
            f"| `chimera::dag_solve` (level-parallel forward substitution) | {ms(r['chimera_dag_solve'])} | "
            f"**{r['ratio']:.2f}x** (target <= 1.2x) |"]


def neumann_section(r):
    return ["## Neumann series vs K sparse products (issue 3)", "",
            "`python benchmarks/bench_neumann.py --out benchmarks/results/neumann_cpu.json`", "", header(r), "",
            f"Random undirected graph, {r['nodes']} nodes, {r['edges']} directed edges, width {r['width']}, "
            f"K = {r['terms']}, forward, interleaved.", "",
            "| computation | time (median) | ratio |", "|---|---|---|",
            f"| {r['baseline']} (baseline) | {ms(r['sparse_mm_calls'])} | 1.00x |",
            f"| `neumann` (checkpointed Horner, `chimera::spmm` with fused `X + A H`) | {ms(r['chimera_neumann'])} | "
            f"**{r['ratio']:.2f}x** (target <= 1.2x: missed) |", "",
            "One `chimera::spmm` call alone runs at 1.0x to 1.2x of `torch.sparse.mm` at this width; the rest "
            "is the allocation of a fresh 20 MB state per step (first-touch page faults) that a multi-step "
            "kernel with reused buffers would avoid."]


def scaling_section(r):
    models = list(r["runs"])
    sizes = sorted({int(n) for runs in r["runs"].values() for n in runs})
    lines = ["## Scaling with the number of nodes (issue 3)", "",
             "`python benchmarks/bench_scaling.py --out benchmarks/results/scaling_cpu.json`", "",
             f"Device: {r['device']}; date: {r['date']}; one tree-shaped molecule-like graph, width 64, 4 heads; "
             f"forward + backward, each point in its own process (peak resident memory, limit "
             f"{r['memory_limit_gb']:.0f} GB)."
             + (f" Models not rerun keep their points from the run of {r['merged_from']}." if r.get("merged_from")
                else ""), "",
             "![time and memory against nodes](benchmarks/results/scaling_cpu.png)", "",
             "| nodes | " + " | ".join(f"{m} time | {m} peak RSS" for m in models) + " |",
             "|---|" + "---|---|" * len(models)]
    for n in sizes:
        cells = []
        for m in models:
            e = r["runs"][m].get(str(n))
            if e is None:
                cells += ["-", "-"]
            elif e["oom"]:
                cells += ["out of memory", "-"]
            else:
                cells += [f"{e['seconds']:.3g} s", f"{e['peak_rss_mib']:.0f} MiB"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "PyTorch's CPU multihead attention does not materialize the N x N matrix, so GPSConv does not "
              "run out of memory on CPU: it grows quadratically in time instead. `chimera_auto` takes `dense` up "
              "to 768 nodes and `iterative` (exact to 1e-6, pure-PyTorch fixed point) beyond, linear per "
              "iteration; its constant is what the fused kernels of issue 3 still have to cut."]
    return lines


def main():
    out = ["# Benchmarks", "",
           "Every figure is a ratio against a baseline timed in the same process on the same inputs; the JSON "
           "behind each table is in `benchmarks/results/` and this file is written by "
           "`python benchmarks/report.py`. The shared 2-core development machine drifts by 15% or more "
           "between runs, so baselines are timed interleaved with (or before and after) the code under test: "
           "compare ratios, not milliseconds. No GPU was lent to the sessions that produced these figures: "
           "every number here is CPU, and the CUDA kernels are compiled but untested on a GPU.", ""]
    for name, section in (("layer_cpu.json", layer_section), ("line_cpu.json", line_section),
                          ("dag_cpu.json", dag_section), ("neumann_cpu.json", neumann_section),
                          ("scaling_cpu.json", scaling_section)):
        r = load(name)
        if r is not None:
            out += section(r) + [""]
    with open(os.path.join(HERE, "..", "BENCHMARKS.md"), "w") as f:
        f.write("\n".join(out))
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
