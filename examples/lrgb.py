"""Chimera-GPS against the GraphGPS Transformer and GCN on the Long Range Graph Benchmark.

Without --root it trains the three models on PeptidesMini, 2,000 real peptides that ship with the
package (peptides-struct's 11 structural targets, MAE), in a few minutes on a laptop CPU. With
--root it runs the four LRGB tasks with the paper's hyperparameters (Table 11; for peptides the
tuned configuration of the review discussion), several seeds, and prints the paper's Table 4 rows.

    python examples/lrgb.py                                    # the main job, offline
    python examples/lrgb.py --root data/lrgb                   # all four tasks, models, 4 seeds
    python examples/lrgb.py --root data/lrgb --dataset peptides-func --model chimera --seeds 0
    torchrun --nproc_per_node 2 examples/lrgb.py --root data/lrgb --dataset peptides-func

Metrics are LRGB's own: AP for peptides-func, MAE for peptides-struct, macro F1 for the
superpixel tasks. The reported test score is the one at the epoch with the best validation score.
Every run checkpoints each epoch under --out and resumes from there when started again (a second
invocation of a finished command only reprints its table; --no-resume trains again). On CPU the
results are bitwise reproducible for a seed at a fixed --threads (default 1): the thread count
changes the order in which floating-point sums are taken, and ten epochs amplify that into
differences in the second decimal.
"""
import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples/_threads.py, examples/_common.py
from _threads import pin_threads  # noqa: E402

if __name__ == "__main__":
    pin_threads(sys.argv[1:], default=1)  # before torch starts: see examples/_threads.py

import torch  # noqa: E402  (after the thread count is in the environment)
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch_geometric.loader import DataLoader  # noqa: E402

from torch_geometric_chimera.lrgb import (LRGB_TASKS, MODELS, TASKS, LRGBModel, average_precision,
                                         count_parameters, load_splits, macro_f1, mean_absolute_error,
                                         width_for_budget)  # noqa: E402
from _common import (HelpFormatter, fingerprint_first, fingerprint_losses, fingerprint_record,  # noqa: E402
                     note_threads_of_this_process, plot_seeds, pyplot, resolve_device, tqdm, without_options)

MODEL_TITLES = {"chimera": "Chimera-GPS (ours)", "gps": "GraphGPS+Transformer", "gcn": "GCN"}
HYPERPARAMETERS = ("lr", "dropout", "layers", "hidden", "heads", "state_dim", "expand", "head_layers",
                   "batch_size", "epochs", "norm_style", "warmup", "weight_decay")


def _task_defaults(name: str) -> str:
    """``"default: 0.002 (peptides-mini), 0.001 (peptides), ..."`` from the task configurations."""
    groups = {"peptides-mini": "peptides-mini", "peptides-func": "peptides", "pascalvoc-sp": "superpixels"}
    values = {}
    for task, group in groups.items():
        values.setdefault(TASKS[task].config[name], []).append(group)
    if len(values) == 1:
        return f"default: {next(iter(values))} (every task)"
    return "default: " + ", ".join(f"{v} ({', '.join(g)})" for v, g in values.items())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--root", default=None, help="LRGB data directory (downloaded there when online)")
    parser.add_argument("--dataset", default=None,
                        help=f"comma list of {LRGB_TASKS + ['peptides-mini']} or 'all' (default: peptides-mini "
                             f"without --root, all four LRGB tasks with it)")
    parser.add_argument("--model", default="all", help=f"comma list of {list(MODELS)} or 'all'")
    parser.add_argument("--seeds", default=None, help="comma list (default: 0 for peptides-mini, else 0,1,2,3)")
    for name in HYPERPARAMETERS:  # default: the task's configuration (see torch_geometric_chimera.lrgb.tasks)
        kind = str if name == "norm_style" else float if name in ("lr", "dropout", "weight_decay") else int
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=_task_defaults(name))
    parser.add_argument("--method", default="auto", help="Chimera's resolvent method")
    parser.add_argument("--budget", type=int, default=500_000, help="parameter budget of every model")
    parser.add_argument("--allow-over-budget", action="store_true", help="run models over --budget anyway")
    parser.add_argument("--no-match-budget", action="store_true",
                        help="keep the baselines' width instead of widening them to Chimera's parameter count")
    parser.add_argument("--limit", type=int, default=None, help="use the first N graphs of each split (smoke runs)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many epochs in this invocation; the next one resumes")
    parser.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', ...")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (set as OMP_NUM_THREADS and MKL_NUM_THREADS before torch starts); results "
                             "are reproducible for a fixed count, and differ between counts; 0 keeps the environment's")
    parser.add_argument("--out", default="runs/lrgb", help="logs, checkpoints, summary.json, table.md and plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--record", default=None, metavar="JSON",
                        help="also write the summary where benchmarks/report.py reads it (the main job: "
                             "benchmarks/results/main_job_cpu.json), with the learning curves and the code's "
                             "fingerprint (see --fingerprint-only) beside it")
    parser.add_argument("--fingerprint-only", action="store_true",
                        help="train nothing: print the fingerprint of the code (every model of the table, seed 0, "
                             "a few optimizer steps on the first training batch, unshuffled) that "
                             "--record stores and tests/test_readme.py checks")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.datasets = ((["peptides-mini"] if args.root is None else LRGB_TASKS) if args.dataset is None
                     else LRGB_TASKS if args.dataset == "all" else args.dataset.split(","))
    args.models = list(MODELS) if args.model == "all" else args.model.split(",")
    for name in args.datasets:
        if name not in TASKS:
            parser.error(f"--dataset: expected names from {sorted(TASKS)}, got {name!r}")
    for name in args.models:
        if name not in MODELS:
            parser.error(f"--model: expected names from {list(MODELS)}, got {name!r}")
    return args


# ----------------------------------------------------------------------------- distributed
def init_distributed(device: torch.device):
    """(rank, world size); under torchrun a process group (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def barrier(world: int):
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- training
def task_loss(task, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task.loss == "bce":
        labeled = ~torch.isnan(target)
        return F.binary_cross_entropy_with_logits(output[labeled], target[labeled])
    if task.loss == "l1":
        return F.l1_loss(output, target)
    # LRGB's weighted cross-entropy for the superpixel tasks: rare classes weigh more.
    counts = torch.bincount(target, minlength=output.size(-1)).float()
    weight = (target.numel() - counts) / target.numel() * (counts > 0)
    return F.cross_entropy(output, target, weight=weight)


def score(task, output: torch.Tensor, target: torch.Tensor) -> float:
    if task.metric == "ap":
        return average_precision(target, torch.sigmoid(output))
    if task.metric == "mae":
        return mean_absolute_error(target, output)
    return macro_f1(target, output)


def target_of(task, data) -> torch.Tensor:
    return data.y.long() if task.loss == "weighted_ce" else data.y.float().view(-1, task.num_outputs)


@torch.no_grad()
def evaluate(model, loader, task, device) -> Dict[str, float]:
    model.eval()
    outputs, targets = [], []
    for data in loader:
        data = data.to(device)
        outputs.append(model(data).float().cpu())
        targets.append(target_of(task, data).cpu())
    output, target = torch.cat(outputs), torch.cat(targets)
    return {"loss": task_loss(task, output, target).item(), "metric": score(task, output, target)}


def warmup_cosine(optimizer, warmup: int, epochs: int):
    def factor(epoch):
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_states(device: torch.device, world: int) -> List[Dict[str, object]]:
    """Every process's generator states (CPU, and every CUDA device's when the run is on CUDA), one
    entry per rank. Stored as ``bytes``, not tensors: ``torch.load(map_location=cuda)`` would move a
    state tensor onto the GPU, and ``torch.set_rng_state`` takes CPU ``ByteTensor`` only."""
    state = {"cpu": torch.get_rng_state().numpy().tobytes()}
    if device.type == "cuda":
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(states: List[Dict[str, object]], rank: int):
    """Undo :func:`rng_states` for this rank."""
    def as_tensor(data):  # bytearray: torch.frombuffer needs a writable buffer
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    if isinstance(states, torch.Tensor):  # checkpoints written before the CUDA states were kept
        torch.set_rng_state(states.cpu())
        return
    state = states[rank % len(states)]
    torch.set_rng_state(as_tensor(state["cpu"]))
    cuda = state.get("cuda", [])
    if cuda and torch.cuda.is_available():
        # A checkpoint from a machine with more GPUs restores the devices this one has.
        torch.cuda.set_rng_state_all([as_tensor(s) for s in cuda[:torch.cuda.device_count()]])


def save_atomic(obj, path: str):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # a run killed while saving keeps its previous checkpoint


def run(task, model_name: str, seed: int, hp: Dict, splits, args, device, rank: int, world: int) -> Dict:
    run_dir = os.path.join(args.out, task.name, model_name, f"seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    torch.manual_seed(seed)
    model = LRGBModel(task, model_name, hidden=hp["width"], layers=hp["layers"], heads=hp["heads"],
                      dropout=hp["dropout"], head_layers=hp["head_layers"], state_dim=hp["state_dim"],
                      expand=hp["expand"], norm_style=hp["norm_style"], method=args.method).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    scheduler = warmup_cosine(optimizer, hp["warmup"], hp["epochs"])
    state = {"epoch": 0, "history": [], "best": None}
    if os.path.exists(checkpoint_path) and not args.no_resume:
        saved = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if saved["hp"] != hp:
            raise SystemExit(f"{checkpoint_path} was written with other hyperparameters ({saved['hp']}); "
                             f"pass --no-resume to start over or use another --out")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        restore_rng_states(saved["rng"], rank)
        state = {k: saved[k] for k in ("epoch", "history", "best")}
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                            else None)

    sampler = (torch.utils.data.distributed.DistributedSampler(splits["train"], world, rank, seed=seed)
               if world > 1 else None)
    eval_loaders = {s: DataLoader(splits[s], batch_size=hp["batch_size"]) for s in ("val", "test")}
    better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)
    last = hp["epochs"] if args.stop_after is None else min(hp["epochs"], state["epoch"] + args.stop_after)
    bar = tqdm(range(state["epoch"] + 1, last + 1), desc=f"{task.name} {model_name} seed {seed}",
               disable=args.quiet or rank != 0, initial=state["epoch"], total=hp["epochs"])
    start, resumed_at = time.perf_counter(), state["epoch"]
    for epoch in bar:
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        # Shuffling from (seed, epoch) alone, so that a resumed run sees the same batches.
        loader = DataLoader(splits["train"], batch_size=hp["batch_size"], sampler=sampler,
                            shuffle=sampler is None, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        total, count = 0.0, 0
        for data in loader:
            data = data.to(device)
            optimizer.zero_grad()
            loss = task_loss(task, trained(data), target_of(task, data))
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
        scheduler.step()
        val, test = evaluate(model, eval_loaders["val"], task, device), evaluate(model, eval_loaders["test"], task,
                                                                                 device)
        record = {"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val["loss"],
                  "val": val["metric"], "test": test["metric"], "lr": scheduler.get_last_lr()[0],
                  "seconds": time.perf_counter() - start}
        state["history"].append(record)
        if state["best"] is None or better(val["metric"], state["best"]["val"]):
            state["best"] = {"epoch": epoch, "val": val["metric"], "test": test["metric"]}
            if rank == 0:
                save_atomic(model.state_dict(), os.path.join(run_dir, "best.pt"))
        state["epoch"] = epoch
        rng = rng_states(device, world)  # a collective under torchrun: every rank takes part
        if rank == 0:
            save_atomic({"hp": hp, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": rng, **state}, checkpoint_path)
            with open(os.path.join(run_dir, "history.json"), "w") as f:
                json.dump({"hp": hp, **state}, f, indent=1)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{record['train_loss']:.4f}", val=f"{record['val']:.4f}",
                                best=f"{state['best']['val']:.4f}")
        barrier(world)
    return {"params": count_parameters(model), "width": hp["width"], "finished": state["epoch"] == hp["epochs"],
            "trained_epochs": state["epoch"] - resumed_at, **state}


# ----------------------------------------------------------------------------- reporting
def mean_std(values: List[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.4f} ± {t.std(unbiased=False):.4f}"  # population std over seeds, as LRGB reports


def table(results: Dict, datasets: List[str], models: List[str], budget: int) -> str:
    lines = ["| Method (< {}k params) | {} |".format(budget // 1000, " | ".join(TASKS[d].title for d in datasets)),
             "|---|" + "---|" * len(datasets)]
    for m in models:
        cells = []
        for d in datasets:
            runs = results.get(d, {}).get(m, [])
            cells.append(f"{mean_std([r['best']['test'] for r in runs])} ({runs[0]['params'] / 1e3:.0f}k)"
                         if runs else "-")
        lines.append(f"| {MODEL_TITLES[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: Dict, path: str):
    """Validation score and training loss per epoch: the mean over seeds, and every seed thinly."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, len(results), figsize=(4.5 * len(results), 6.5), squeeze=False)
    for col, (dataset, per_model) in enumerate(results.items()):
        for model_name, runs in per_model.items():
            color = plot_seeds(axes[0][col], runs, "epoch", lambda h: h["val"], f"{model_name} val")
            plot_seeds(axes[1][col], runs, "epoch", lambda h: h["train_loss"], f"{model_name} train", color)
        axes[0][col].set_title(TASKS[dataset].title)
        axes[0][col].set_ylabel(TASKS[dataset].metric.upper())
        axes[1][col].set_ylabel("training loss")
        axes[1][col].set_xlabel("epoch")
        for ax in axes[:, col]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}")


def record(summary: Dict, args, curves: str, fingerprint: Dict):
    """Write ``summary`` as a benchmark result (``benchmarks/report.py`` renders it into BENCHMARKS.md)."""
    import datetime
    import platform
    import shutil
    directory = os.path.dirname(os.path.abspath(args.record))
    os.makedirs(directory, exist_ok=True)
    result = {"device": f"{platform.machine()} {summary['device']}, {summary['threads']} thread{'s' if summary['threads'] != 1 else ''}",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__,
              "command": "python examples/lrgb.py " + " ".join(without_options(args.argv, ("--record",))),
              **{k: summary[k] for k in ("table", "seconds", "runs", "threads", "load_average")},
              "fingerprint": fingerprint}
    with open(args.record, "w") as f:
        json.dump(result, f, indent=1)
    stem = os.path.splitext(os.path.basename(args.record))[0]
    kind = torch.device(summary["device"]).type
    stem = stem[:-len(kind) - 1] if stem.endswith("_" + kind) else stem
    if os.path.exists(curves):  # main_job_cpu.json -> main_job_learning_curves.png, the name BENCHMARKS.md links
        shutil.copyfile(curves, os.path.join(directory, f"{stem}_learning_curves.png"))
    print(f"saved {args.record}; `python benchmarks/report.py` writes it into BENCHMARKS.md")


def resume_note(results: Dict, out: str) -> str:
    """Tell that runs resume from ``out``, and which ones this invocation only read back."""
    runs = [(d, m, r) for d, per_model in results.items() for m, rs in per_model.items() for r in rs]
    reused = [f"{d}/{m}/seed{r['seed']}" for d, m, r in runs if r["finished"] and r["trained_epochs"] == 0]
    if reused:
        return (f"\n{len(reused)} of {len(runs)} runs had already finished under {out} and were not trained again "
                f"({', '.join(reused)}): their rows are read from the checkpoints. Pass --no-resume (or another "
                f"--out) to train from scratch.")
    return (f"\nCheckpoints are under {out}: running this command again resumes unfinished runs and only reprints "
            f"the table of finished ones. Pass --no-resume (or another --out) to train from scratch.")


def hyperparameters(task, args) -> Dict:
    hp = dict(task.config)
    for name in HYPERPARAMETERS:
        if getattr(args, name) is not None:
            hp[name] = getattr(args, name)
    return hp


def model_options(hp: Dict) -> Dict:
    return {k: hp[k] for k in ("layers", "heads", "dropout", "head_layers", "state_dim", "expand", "norm_style")}


def model_widths(task, hp: Dict, args) -> Dict[str, int]:
    """Every model's width; equal budget: the baselines are widened (or narrowed) to Chimera's
    parameter count (unless --no-match-budget)."""
    chimera_params = count_parameters(LRGBModel(task, "chimera", hidden=hp["hidden"], **model_options(hp)))
    widths = {}
    for model_name in args.models:
        widths[model_name] = hp["hidden"]
        if model_name != "chimera" and not args.no_match_budget:
            widths[model_name] = width_for_budget(task, model_name, min(chimera_params, args.budget),
                                                  step=math.lcm(4, hp["heads"]), **model_options(hp))
    return widths


def fingerprint(args) -> Dict:
    """The code's fingerprint for this command's table (see examples/_common.py): each model of each
    task, built as the run builds it (seed 0), takes a few optimizer steps on the task's first
    --batch-size training graphs (a batch as the run's, so that ``auto`` picks the same paths); the
    losses, as full floats."""
    from torch_geometric.data import Batch
    losses, sizes = {}, []
    for dataset in args.datasets:
        task = TASKS[dataset]
        hp = hyperparameters(task, args)
        batch = Batch.from_data_list(list(load_splits(dataset, args.root)["train"][:hp["batch_size"]]))
        sizes.append(batch.num_graphs)
        target = target_of(task, batch)
        for model_name, width in model_widths(task, hp, args).items():
            torch.manual_seed(0)
            model = LRGBModel(task, model_name, hidden=width, method=args.method, **model_options(hp))
            optimizer = torch.optim.Adam(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
            losses[f"{dataset}/{model_name}"] = fingerprint_losses(
                model, optimizer, lambda: task_loss(task, model(batch), target))
    return fingerprint_record("examples/lrgb.py", without_options(args.argv, ("--fingerprint-only", "--threads")),
                              sizes[0] if len(set(sizes)) == 1 else sizes, losses)


def main(argv=None):
    args = parse_args(argv)
    only, recorded_fingerprint = fingerprint_first(args, "examples/lrgb.py", fingerprint)
    if only is not None:
        return only
    note_threads_of_this_process(args.threads)  # the summary records the count in use
    device = resolve_device(args.device)
    rank, world = init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    log = print if rank == 0 else (lambda *a, **k: None)
    results, summary = {}, {"args": vars(args), "device": str(device), "world_size": world,
                            "threads": torch.get_num_threads(), "torch": torch.__version__, "runs": {}}
    # A shared machine's load makes the seconds meaningless (not the scores): keep it on record.
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for dataset in args.datasets:
        task = TASKS[dataset]
        hp = hyperparameters(task, args)
        splits = load_splits(dataset, args.root)
        if args.limit is not None:
            splits = {k: v[:args.limit] for k, v in splits.items()}
        log(f"\n{dataset}: " + ", ".join(f"{k} {len(v)} graphs" for k, v in splits.items()) + f"; {hp}")
        results[dataset] = {}
        for model_name, width in model_widths(task, hp, args).items():
            params = count_parameters(LRGBModel(task, model_name, hidden=width, **model_options(hp)))
            log(f"{MODEL_TITLES[model_name]}: width {width}, {params:,} parameters")
            if params > args.budget and not args.allow_over_budget:
                raise SystemExit(f"{model_name} has {params:,} parameters, over the --budget of {args.budget:,}; "
                                 f"pass --allow-over-budget to run it anyway")
            seeds = [int(s) for s in (args.seeds or ("0" if dataset == "peptides-mini" else "0,1,2,3")).split(",")]
            runs = []
            for seed in seeds:
                result = run(task, model_name, seed, dict(hp, width=width), splits, args, device, rank, world)
                runs.append({"seed": seed, **result})
            results[dataset][model_name] = runs
        summary["runs"][dataset] = {m: [{k: r[k] for k in ("seed", "params", "width", "best", "finished",
                                                          "trained_epochs")}
                                        for r in runs] for m, runs in results[dataset].items()}

    if rank == 0:
        report = table(results, args.datasets, args.models, args.budget)
        seconds = {d: {m: round(sum(r["history"][-1]["seconds"] if r["trained_epochs"] else 0 for r in runs), 1)
                       for m, runs in per_model.items()} for d, per_model in results.items()}
        print(f"\nTest score at the best validation epoch, mean ± std over seeds ({device}, "
              f"{torch.get_num_threads()} CPU thread(s), world size {world}):\n")
        print(report)
        print(f"\ntraining seconds (this invocation): {seconds}")
        load_at_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        summary.update(table=report, seconds=seconds, load_average=[load_at_start, load_at_end])
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(report + "\n")
        print(f"saved {os.path.join(args.out, 'summary.json')} and table.md")
        plot(results, os.path.join(args.out, "learning_curves.png"))
        if args.record is not None:
            record(summary, args, os.path.join(args.out, "learning_curves.png"), recorded_fingerprint)
        print(resume_note(results, args.out))  # last, where a user reading a reprinted table looks
    barrier(world)
    if world > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
