"""Time and peak memory of ChimeraConv and PyG GPSConv against the number of nodes (one graph).

Every (model, size) runs forward + backward in its own subprocess, so that peak resident memory
(ru_maxrss) belongs to that run alone; on the CPU an address-space limit (--memory-gb) turns an
allocation beyond it into a reported out-of-memory instead of swapping. On CUDA the peak is
``torch.cuda.max_memory_allocated`` (``peak_cuda_mib``), and no address-space limit is set (CUDA
reserves far more address space than it uses). The graph is a random tree (``--graph tree``) or a
square grid of about the requested size (``--graph grid``, side ``round(sqrt(n))``). Writes JSON
and a two-panel plot.

    python benchmarks/bench_scaling.py --out benchmarks/results/scaling_cpu.json
    python benchmarks/bench_scaling.py --device cuda --graph grid --width 32 --sizes 1000000 --out scaling.json
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def graph_of(kind: str, num_nodes: int):
    """``(edge_index, num_nodes)`` of a random tree of ``num_nodes`` nodes, or of the square grid
    whose side is ``round(sqrt(num_nodes))`` (4-neighbour edges, both directions)."""
    import torch
    from torch_geometric.utils import to_undirected

    from torch_geometric_chimera.utils import grid_graph_dags
    if kind == "grid":
        side = max(1, round(num_nodes ** 0.5))
        return to_undirected(grid_graph_dags(side, side)[0], num_nodes=side * side), side * side
    parent = (torch.rand(num_nodes - 1) * torch.arange(1, num_nodes)).long()
    return to_undirected(torch.stack([parent, torch.arange(1, num_nodes)]), num_nodes=num_nodes), num_nodes


def child(model: str, num_nodes: int, memory_gb: float, device: str = "cpu", graph: str = "tree",
          width: int = 64) -> dict:
    if not device.startswith("cuda"):
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch
    from torch_geometric.nn import GCNConv, GPSConv

    from torch_geometric_chimera.nn import ChimeraConv
    torch.manual_seed(0)
    device = torch.device(device)
    edge_index, num_nodes = graph_of(graph, num_nodes)
    edge_index = edge_index.to(device)
    x = torch.randn(num_nodes, width, device=device)
    batch = torch.zeros(num_nodes, dtype=torch.long, device=device)
    if model == "gpsconv":
        layer = GPSConv(width, GCNConv(width, width), heads=4, attn_type="multihead").to(device)
        run = lambda: layer(x, edge_index, batch)  # noqa: E731
    else:
        layer = ChimeraConv(width, heads=4, state_dim=16, expand=1, method=model.split("_")[1]).to(device)
        run = lambda: layer(x, edge_index, None, batch)  # noqa: E731

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    try:
        run().square().mean().backward()  # warm-up
        synchronize()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        run().square().mean().backward()
        synchronize()
        seconds = time.perf_counter() - start
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        return {"oom": True, "error": str(error).splitlines()[0][:200]}
    entry = {"oom": False, "nodes": num_nodes, "seconds": seconds,
             "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        entry["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return entry


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,300,1000,3000,10000,30000,100000")
    parser.add_argument("--models", default="gpsconv,chimera_auto")
    parser.add_argument("--memory-gb", type=float, default=16.0, help="address-space limit of a CPU run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--graph", default="tree", choices=["tree", "grid"])
    parser.add_argument("--width", type=int, default=64, help="channels of both layers (4 heads)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "scaling_cpu.json"))
    parser.add_argument("--merge", action="store_true", help="keep the other models' runs already in --out")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.memory_gb, args.device, args.graph,
                               args.width)))
        return
    sys.path.insert(0, HERE)
    from common import write_json
    if args.device.startswith("cuda"):
        import torch
        device = f"{torch.cuda.get_device_name(torch.device(args.device))} (CUDA)"
    else:
        device = f"CPU ({os.cpu_count()} cores)"
    results = {"device": device, "graph": args.graph, "width": args.width, "memory_limit_gb": args.memory_gb,
               "runs": {}}
    if args.merge and os.path.exists(args.out):
        previous = json.load(open(args.out))
        results["runs"] = previous["runs"]
        results["merged_from"] = previous.get("date")
    for model in args.models.split(","):
        results["runs"].setdefault(model, {})
        for size in map(int, args.sizes.split(",")):
            proc = subprocess.run([sys.executable, __file__, "--child", model, str(size), "--memory-gb",
                                   str(args.memory_gb), "--device", args.device, "--graph", args.graph,
                                   "--width", str(args.width)], capture_output=True, text=True)
            lines = proc.stdout.strip().splitlines()
            entry = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                "oom": True, "error": (proc.stderr.strip().splitlines() or ["killed"])[-1][:200]}
            results["runs"][model][str(size)] = entry
            print(model, size, entry)
            if entry["oom"]:
                break  # larger graphs only need more
    write_json(args.out, results)
    plot(results, args.out.replace(".json", ".png"))


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    for model, runs in results["runs"].items():
        ok = {int(n): r for n, r in runs.items() if not r["oom"]}
        sizes = sorted(ok)
        ax_time.loglog(sizes, [ok[n]["seconds"] for n in sizes], "o-", label=model)
        ax_mem.loglog(sizes, [ok[n].get("peak_cuda_mib", ok[n]["peak_rss_mib"]) for n in sizes], "o-", label=model)
        failed = [int(n) for n, r in runs.items() if r["oom"]]
        for n in failed:
            ax_time.axvline(n, color="gray", ls=":", lw=1)
            ax_time.annotate(f"{model}\nout of memory", (n, ax_time.get_ylim()[0]), fontsize=7)
    ax_time.set(xlabel="nodes", ylabel="forward + backward (s)", title="time")
    ax_mem.set(xlabel="nodes", ylabel="peak memory (MiB; CUDA: allocated, CPU: resident)", title="memory")
    ax_time.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
