"""One LRGB training step (forward, backward, Adam) of the full-size models, and the wall-clock
time of a whole LRGB run extrapolated from it.

The models are those of examples/lrgb.py at their default configuration (the paper's Table 11;
for peptides the review discussion's tuned one), the baselines widened to Chimera's parameter
count. Batches have the benchmark's sizes: 64 real peptides of about 150 atoms (RDKit), or 32
superpixel-like graphs of about 480 nodes and 5.6 edges per node. Chimera, GPS and GCN steps are
timed interleaved in this process; the figure of merit is the ratio Chimera-GPS / GraphGPS.

    python benchmarks/bench_lrgb_step.py --out benchmarks/results/lrgb_step_cpu.json
"""
import argparse
import math

import torch
from common import device_name, peptide_like_batch, real_peptide_batch, time_interleaved, write_json
from torch_geometric.data import Batch, Data
from torch_geometric.utils import to_undirected

from torch_geometric_chimera.lrgb import TASKS, LRGBModel, count_parameters, width_for_budget

# Training graphs per task (LRGB's splits) for the extrapolation.
TRAIN_GRAPHS = {"peptides-func": 10_873, "pascalvoc-sp": 8_498, "coco-sp": 113_286}
EVAL_GRAPHS = {"peptides-func": 4_662, "pascalvoc-sp": 2_857, "coco-sp": 10_000}


def superpixel_like_batch(num_graphs: int, mean_nodes: int = 480, seed: int = 0):
    """Region adjacency-like graphs: each node linked to about 2.8 nearby nodes (5.6 directed edges)."""
    generator = torch.Generator().manual_seed(seed)
    graphs = []
    for _ in range(num_graphs):
        n = int(torch.randint(mean_nodes * 2 // 3, mean_nodes * 4 // 3 + 1, (1,), generator=generator))
        src = torch.arange(n).repeat_interleave(3)
        dst = (src + torch.randint(1, 24, (src.numel(),), generator=generator)) % n
        edge_index = to_undirected(torch.stack([src, dst]), num_nodes=n)
        graphs.append(Data(x=torch.rand(n, 14, generator=generator), edge_index=edge_index,
                           edge_attr=torch.rand(edge_index.size(1), 2, generator=generator),
                           y=torch.randint(0, 21, (n,), generator=generator)))
    return Batch.from_data_list(graphs)


def peptide_batch(num_graphs: int):
    """Real peptides built by RDKit when it is installed, else random trees of the same size."""
    try:
        edge_index, batch, num_nodes = real_peptide_batch(num_graphs)
    except ImportError:
        edge_index, batch, num_nodes = peptide_like_batch(num_graphs)
    return Batch(x=torch.stack([torch.randint(0, v, (num_nodes,)) for v in (119, 4, 12, 12, 10, 6, 6, 2, 2)], 1),
                 edge_index=edge_index, edge_attr=torch.randint(0, 2, (edge_index.size(1), 3)), batch=batch,
                 y=torch.rand(batch.max().item() + 1, 10).round(), ptr=None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", default="peptides-func,pascalvoc-sp")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--graphs", type=int, default=None,
                        help="graphs per batch (default: the task's batch size; fewer for a smoke run)")
    parser.add_argument("--layers", type=int, default=None,
                        help="layers of every model (default: the task's; fewer for a smoke run)")
    parser.add_argument("--out", default="benchmarks/results/lrgb_step.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.graphs is not None and args.graphs < 1:
        parser.error(f"--graphs: expected a positive number of graphs, got {args.graphs}")
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers: expected a positive number of layers, got {args.layers}")
    results = {"device": device_name(device), "tasks": {}}
    for name in args.tasks.split(","):
        task, hp = TASKS[name], dict(TASKS[name].config)
        if args.layers is not None:
            hp["layers"] = args.layers
        options = {k: hp[k] for k in ("layers", "heads", "dropout", "head_layers", "state_dim", "expand",
                                      "norm_style")}
        torch.manual_seed(0)
        num_graphs = hp["batch_size"] if args.graphs is None else args.graphs
        data = (peptide_batch(num_graphs) if task.features == "molecule"
                else superpixel_like_batch(num_graphs)).to(device)
        chimera_params = count_parameters(LRGBModel(task, "chimera", hidden=hp["hidden"], **options))
        steps, params = {}, {}
        for model_name in ("chimera", "gps", "gcn"):
            width = hp["hidden"] if model_name == "chimera" else width_for_budget(
                task, model_name, chimera_params, step=math.lcm(4, hp["heads"]), **options)
            model = LRGBModel(task, model_name, hidden=width, **options).to(device)
            params[model_name] = count_parameters(model)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            target = data.y.float() if task.level == "graph" else data.y

            def step(model=model, optimizer=optimizer, target=target):
                optimizer.zero_grad(set_to_none=True)
                out = model(data)
                loss = (torch.nn.functional.binary_cross_entropy_with_logits(out, target) if task.level == "graph"
                        else torch.nn.functional.cross_entropy(out, target))
                loss.backward()
                optimizer.step()
            steps[model_name] = step
        timings = time_interleaved(steps, device, warmup=1, reps=args.reps)
        batches = math.ceil(TRAIN_GRAPHS[name] / num_graphs)
        # Evaluation (forward only) costs about a third of a training step per batch.
        eval_batches = math.ceil(EVAL_GRAPHS[name] / num_graphs) / 3
        entry = {"nodes": int(data.num_nodes), "edges": int(data.num_edges), "graphs": int(data.num_graphs),
                 "layers": hp["layers"], "params": params, "epochs": hp["epochs"], "step": timings,
                 "ratio_chimera_over_gps": timings["chimera"]["median_s"] / timings["gps"]["median_s"]}
        entry["hours_per_seed"] = {m: t["median_s"] * (batches + eval_batches) * hp["epochs"] / 3600
                                   for m, t in timings.items()}
        results["tasks"][name] = entry
        print(f"{name}: {entry['nodes']} nodes, {entry['edges']} edges per batch; params {params}")
        for m, t in timings.items():
            print(f"  {m:8s} {t['median_s'] * 1e3:8.1f} ms/step  ~{entry['hours_per_seed'][m]:.1f} h per seed "
                  f"({hp['epochs']} epochs)")
        print(f"  Chimera-GPS / GraphGPS: {entry['ratio_chimera_over_gps']:.2f}x")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
