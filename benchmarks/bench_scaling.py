"""Time and peak memory of ChimeraConv and PyG GPSConv against the number of nodes (one graph).

Every (model, size) runs forward + backward in its own subprocess, so that peak resident memory
(ru_maxrss) belongs to that run alone; an address-space limit (--memory-gb) turns an allocation
beyond it into a reported out-of-memory instead of swapping. Writes JSON and a two-panel plot.

    python benchmarks/bench_scaling.py --out benchmarks/results/scaling_cpu.json
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(model: str, num_nodes: int, memory_gb: float) -> dict:
    limit = int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch
    from torch_geometric.nn import GCNConv, GPSConv
    from torch_geometric.utils import to_undirected

    from torch_geometric_chimera.nn import ChimeraConv
    torch.manual_seed(0)
    parent = (torch.rand(num_nodes - 1) * torch.arange(1, num_nodes)).long()
    edge_index = to_undirected(torch.stack([parent, torch.arange(1, num_nodes)]), num_nodes=num_nodes)
    x = torch.randn(num_nodes, 64)
    batch = torch.zeros(num_nodes, dtype=torch.long)
    if model == "gpsconv":
        layer = GPSConv(64, GCNConv(64, 64), heads=4, attn_type="multihead")
        run = lambda: layer(x, edge_index, batch)  # noqa: E731
    else:
        layer = ChimeraConv(64, heads=4, state_dim=16, expand=1, method=model.split("_")[1])
        run = lambda: layer(x, edge_index, None, batch)  # noqa: E731
    try:
        run().square().mean().backward()  # warm-up
        start = time.perf_counter()
        run().square().mean().backward()
        seconds = time.perf_counter() - start
    except (RuntimeError, MemoryError) as error:
        return {"oom": True, "error": str(error).splitlines()[0][:200]}
    return {"oom": False, "seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,300,1000,3000,10000,30000,100000")
    parser.add_argument("--models", default="gpsconv,chimera_auto")
    parser.add_argument("--memory-gb", type=float, default=16.0)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "scaling_cpu.json"))
    parser.add_argument("--merge", action="store_true", help="keep the other models' runs already in --out")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.memory_gb)))
        return
    sys.path.insert(0, HERE)
    from common import write_json
    results = {"device": "CPU (2 threads)", "memory_limit_gb": args.memory_gb, "runs": {}}
    if args.merge and os.path.exists(args.out):
        previous = json.load(open(args.out))
        results["runs"] = previous["runs"]
        results["merged_from"] = previous.get("date")
    for model in args.models.split(","):
        results["runs"].setdefault(model, {})
        for size in map(int, args.sizes.split(",")):
            proc = subprocess.run([sys.executable, __file__, "--child", model, str(size), "--memory-gb",
                                   str(args.memory_gb)], capture_output=True, text=True)
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
        ax_mem.loglog(sizes, [ok[n]["peak_rss_mib"] for n in sizes], "o-", label=model)
        failed = [int(n) for n, r in runs.items() if r["oom"]]
        for n in failed:
            ax_time.axvline(n, color="gray", ls=":", lw=1)
            ax_time.annotate(f"{model}\nout of memory", (n, ax_time.get_ylim()[0]), fontsize=7)
    ax_time.set(xlabel="nodes", ylabel="forward + backward (s)", title="time")
    ax_mem.set(xlabel="nodes", ylabel="peak resident memory (MiB)", title="memory")
    ax_time.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
