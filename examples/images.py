"""Images as graphs: Chimera on the grid DAGs of scikit-learn's handwritten digits (Table 3's shape).

Every 8x8 digit becomes the 4-neighbour grid graph of its 2x2 patches (``ImageToGrid``, 16 nodes of
4 pixels each, as ViT cuts an image into patches) and four models classify it at an equal
parameter budget, over several seeds:

    grid       Chimera on the four directed grid DAGs (Fig. 3), B/C shared as --sharing says (App. B.2)
    crossscan  the cross-scan of vision SSMs (VMamba's SS2D): four raster scans, row- and column-major,
               each forward and reverse, every one a Mamba-2 line, summed
    fwdrev     Chimera on the forward and the reverse raster line (1-D, both directions, Fig. 2)
    fwd        Chimera on the forward raster line alone (1-D, causal: Mamba-2)
    vit        a ViT-style Transformer encoder with learned position embeddings

The four SSMs are one block (ChimeraConv on a decomposition: a 3 x 3 depthwise convolution over the
image for the 2-D models, 7 centred taps or Mamba-2's causal 4 on the raster lines, a selectivity
per DAG and edge direction, gated RMSNorm); only the DAGs differ.

Every model is the same pre-norm stack, only the token mixer differs: a linear patch embedding
plus, for the ViT, learned position embeddings (--pos-emb), --layers blocks of [LayerNorm, mixer, dropout,
residual; LayerNorm, MLP (GELU, 2x width), dropout, residual], a final LayerNorm, mean pooling
over the patches (no class token: the grid has no node for it) and a linear classifier. The
width of each model is the largest one whose parameter count fits --budget.
By default (--pos-emb auto) every model is configured as its authors configure it: the ViT with
learned position embeddings (attention has no other notion of where a patch is), the SSMs without
(the authors' Chimera image model sets use_pos_embed: false; the DAGs and scans give the order).
--pos-emb learned gives every model learned position embeddings, --pos-emb none takes them from every model.

Training: AdamW (--lr, --weight-decay), linear warmup over --warmup epochs then cosine decay to 0,
--epochs epochs of --batch-size images, gradient norm clipped at 1. Data: load_digits (1,797
images, pixel values / 16), split once with --split-seed into 1,197 train / 300 val / 300 test.
The reported test accuracy is the one of the weights at the epoch with the best validation
accuracy (first such epoch), mean ± std (population) over --seeds.

    python examples/images.py                                   # the table in the README
    python examples/images.py --sharing all --model grid        # Table 6: sharing modes
    python examples/images.py --pos-emb learned                 # every model with learned positions
    python examples/images.py --pos-emb none --model grid,vit   # without position information
    python examples/images.py --record                          # refresh benchmarks/results/images_cpu.json

The JSON log and the plot go to --out (runs/images/); only --record writes the recorded results in
benchmarks/results/, with the code's fingerprint (--fingerprint-only) that tests/test_readme.py
compares with the code's.

Needs scikit-learn (pip install scikit-learn); matplotlib for the plot and tqdm for progress bars
are optional.
"""
import argparse
import copy
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples/_threads.py, examples/_common.py
from _threads import pin_threads  # noqa: E402

if __name__ == "__main__":
    pin_threads(sys.argv[1:], default=None)  # before torch starts: see examples/_threads.py

import torch  # noqa: E402  (after the thread count is in the environment)
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from torch_geometric.utils import to_dense_batch

from torch_geometric_chimera.nn import ChimeraConv
from torch_geometric_chimera.nn.decomposition import SHARING
from torch_geometric_chimera.transforms import ImageToGrid

from _common import (Block, HelpFormatter, add_run_arguments, count_parameters, fingerprint_first,  # noqa: E402
                     fingerprint_losses, fingerprint_record, machine_description, mean_std,
                     note_threads_of_this_process, plot_seeds, pyplot, record_paths, record_result, resolve_device,
                     warmup_cosine, without_options)
from _common import tqdm  # noqa: E402  (optional: a plain iterator without it)
from _common import width_for_budget as shared_width_for_budget  # noqa: E402

MODELS = ("grid", "crossscan", "fwdrev", "fwd", "vit")
TITLES = {"grid": "Chimera (2D grid DAGs)", "crossscan": "Cross-scan (4 raster scans, VMamba)",
          "fwdrev": "Fwd & Rev (1-D raster)", "fwd": "Fwd (1-D raster)", "vit": "ViT"}
SPLIT = (1197, 300, 300)  # train, val, test


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="all", help=f"comma list of {list(MODELS)} or 'all'")
    parser.add_argument("--sharing", default="diagonal",
                        help=f"B/C sharing of the grid model (App. B.2), one of {list(SHARING)}, or 'all' to run "
                             f"the grid model once per mode (Table 6)")
    parser.add_argument("--pos-emb", default="auto", choices=POS_EMB,
                        help="learned position embeddings added to the patch embeddings: 'auto' for the ViT alone "
                             "(each model as its authors configure it), 'learned' for every model, 'none' for none")
    parser.add_argument("--dt-range", default="0.001,0.1",
                        help="initial range of every SSM's selectivity Δ, 'min,max' (Mamba-2's by default; the "
                             "authors' ImageNet model used 0.007,0.7)")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of training seeds")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the fixed train/val/test split")
    parser.add_argument("--patch-size", type=int, default=2, help="side of a square patch (1: one node per pixel)")
    parser.add_argument("--budget", type=int, default=25_000, help="parameter budget of every model")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4, help="SSM heads of Chimera, attention heads of the ViT")
    parser.add_argument("--state-dim", type=int, default=16, help="state size S of Chimera's B and C")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2, help="epochs of linear learning-rate warmup")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--limit", type=int, default=None, help="use the first N images of each split (smoke runs)")
    add_run_arguments(parser, "images")
    args = parser.parse_args(argv)
    args.models = list(MODELS) if args.model == "all" else args.model.split(",")
    for name in args.models:
        if name not in MODELS:
            parser.error(f"--model: expected names from {list(MODELS)}, got {name!r}")
    args.sharings = list(SHARING) if args.sharing == "all" else [args.sharing]
    if any(s not in SHARING for s in args.sharings):
        parser.error(f"--sharing: expected one of {list(SHARING)} or 'all', got {args.sharing!r}")
    if args.heads < 1 or args.layers < 1 or args.budget < 1:
        parser.error("--heads, --layers and --budget must be positive")
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.dt_min, args.dt_max = (float(v) for v in args.dt_range.split(","))
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


# ----------------------------------------------------------------------------- data
def load_splits(split_seed: int, patch_size: int, limit: Optional[int] = None) -> Dict[str, List[Data]]:
    """The digits as grid graphs, split once by ``split_seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit("examples/images.py reads scikit-learn's digits: pip install scikit-learn "
                         "(or the package's 'images' extra)") from error

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # pixel values 0..16
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    transform = ImageToGrid(patch_size)
    splits, start = {}, 0
    for name, size in zip(("train", "val", "test"), SPLIT):
        index = order[start:start + size][:limit]
        start += size
        splits[name] = [transform(Data(x=images[i].unsqueeze(0), y=labels[i].view(1))) for i in index.tolist()]
    return splits


# ----------------------------------------------------------------------------- models
class Mixer(nn.Module):
    """The token mixer of one block: a ``ChimeraConv`` on a decomposition, or self-attention."""

    def __init__(self, kind: str, width: int, heads: int, state_dim: int, sharing: str, dropout: float,
                 dt_range=(0.001, 0.1)):
        super().__init__()
        self.kind = kind
        if kind == "vit":
            self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        else:
            decomposition = {"grid": "grid", "crossscan": "cross_scan", "fwdrev": "line", "fwd": "fwd"}[kind]
            # The raster lines have two DAGs (or one): App. B.2's sharing is a grid option.
            self.conv = ChimeraConv(width, heads=heads, state_dim=state_dim, decomposition=decomposition,
                                    sharing=sharing if kind == "grid" else None, dt_min=dt_range[0],
                                    dt_max=dt_range[1])

    def forward(self, x: Tensor, data) -> Tensor:
        if self.kind == "vit":
            dense, mask = to_dense_batch(x, data.batch)
            out = self.attn(dense, dense, dense, key_padding_mask=~mask, need_weights=False)[0]
            return out[mask]
        if self.kind in ("grid", "crossscan"):
            return self.conv(x, data.edge_index, batch=data.batch, grid_size=data.grid_size)
        # The raster line of an image: its nodes are already numbered row by row.
        return self.conv(x, data.edge_index, batch=data.batch, seq_len=data.grid_size.prod(-1))




class DigitClassifier(nn.Module):
    r"""Patch embedding (+ learned position embedding), ``layers`` blocks, mean pooling, classifier."""

    def __init__(self, kind: str, in_channels: int, grid_side: int, width: int, layers: int, heads: int,
                 state_dim: int, sharing: str = "diagonal", dropout: float = 0.1, pos_emb: str = "learned", dt_range=(0.001, 0.1),
                 num_classes: int = 10):
        super().__init__()
        self.grid_side = grid_side
        self.embed = nn.Linear(in_channels, width)
        self.pos = nn.Embedding(grid_side * grid_side, width) if pos_emb == "learned" else None
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(Mixer(kind, width, heads, state_dim, sharing, dropout, dt_range), width, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, data) -> Tensor:
        x = self.embed(data.x)
        if self.pos is not None:  # ImageToGrid's (row, column) of every patch
            x = x + self.pos(data.pos[:, 0].long() * self.grid_side + data.pos[:, 1].long())
        for block in self.blocks:
            x = block(x, data)
        x = self.norm(x)
        pooled = torch.zeros(data.num_graphs, x.size(-1), dtype=x.dtype, device=x.device).index_add_(0, data.batch, x)
        pooled = pooled / torch.bincount(data.batch, minlength=data.num_graphs).clamp_min(1).unsqueeze(-1).to(x.dtype)
        return self.head(pooled)




#: --pos-emb: "auto" gives learned position embeddings to the ViT alone (as ViT and DeiT have them,
#: while the authors' Chimera image model has use_pos_embed: false), "learned" to every model, "none" to none.
POS_EMB = ("auto", "learned", "none")


def pos_emb_of(kind: str, pos_emb: str) -> str:
    """The position embedding of model ``kind`` under ``--pos-emb``: ``"learned"`` or ``"none"``."""
    if pos_emb not in POS_EMB:
        raise ValueError(f"pos_emb: expected one of {POS_EMB}, got {pos_emb!r}")
    if pos_emb == "auto":
        return "learned" if kind == "vit" else "none"
    return pos_emb


def build(kind: str, width: int, args, sharing: str) -> DigitClassifier:
    side = 8 // args.patch_size
    return DigitClassifier(kind, args.patch_size ** 2, side, width, args.layers, args.heads, args.state_dim,
                           sharing, args.dropout, pos_emb_of(kind, args.pos_emb), (args.dt_min, args.dt_max))


def width_for_budget(kind: str, args, sharing: str) -> int:
    return shared_width_for_budget(lambda width: build(kind, width, args, sharing), kind == "vit", args.heads, args.budget, kind)


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model, loader, device) -> Dict[str, float]:
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for data in loader:
        data = data.to(device)
        logits = model(data)
        loss += F.cross_entropy(logits, data.y, reduction="sum").item()
        correct += int((logits.argmax(-1) == data.y).sum())
        count += data.num_graphs
    return {"loss": loss / max(count, 1), "acc": correct / max(count, 1)}


def train_one(kind: str, sharing: str, width: int, seed: int, splits, args, device) -> Dict:
    torch.manual_seed(seed)
    model = build(kind, width, args, sharing).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_cosine(optimizer, args.warmup, args.epochs)
    val_loader = DataLoader(splits["val"], batch_size=256)
    history, best, best_state = [], None, None
    start = time.perf_counter()
    bar = tqdm(range(1, args.epochs + 1), desc=f"{kind}{'/' + sharing if kind == 'grid' else ''} seed {seed}",
               disable=args.quiet, leave=False)
    for epoch in bar:
        model.train()
        loader = DataLoader(splits["train"], batch_size=args.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        total, correct, count = 0.0, 0, 0
        for data in loader:
            data = data.to(device)
            optimizer.zero_grad()
            logits = model(data)
            loss = F.cross_entropy(logits, data.y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += loss.item() * data.num_graphs
            correct += int((logits.argmax(-1) == data.y).sum())
            count += data.num_graphs
        scheduler.step()
        val = evaluate(model, val_loader, device)
        record = {"epoch": epoch, "train_loss": total / max(count, 1), "train_acc": correct / max(count, 1),
                  "val_loss": val["loss"], "val_acc": val["acc"], "seconds": time.perf_counter() - start}
        history.append(record)
        if best is None or val["acc"] > best["val_acc"]:
            best = {"epoch": epoch, "val_acc": val["acc"]}
            best_state = copy.deepcopy(model.state_dict())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{val['acc']:.3f}")
    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    test = evaluate(model, DataLoader(splits["test"], batch_size=256), device)
    best.update(test_acc=test["acc"], test_loss=test["loss"])
    return {"seed": seed, "best": best, "history": history, "seconds": seconds}


# ----------------------------------------------------------------------------- reporting
def table(rows: List[Dict], budget: int) -> str:
    lines = [f"| Model (≤ {budget / 1000:g}k params) | B/C sharing | params | width | test acc. (%) | val acc. (%) "
             f"| s / seed |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        runs = row["runs"]
        lines.append(f"| {TITLES[row['model']]} | {row['sharing'] or '-'} | {row['params']:,} | {row['width']} "
                     f"| {mean_std([r['best']['test_acc'] for r in runs], 100)} "
                     f"| {mean_std([r['best']['val_acc'] for r in runs], 100)} "
                     f"| {sum(r['seconds'] for r in runs) / len(runs):.0f} |")
    return "\n".join(lines)


def plot(rows: List[Dict], path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        label = TITLES[row["model"]] + (f" ({row['sharing']})" if row["sharing"] else "")
        color = plot_seeds(axes[0], row["runs"], "epoch", lambda h: h["train_loss"], label)
        plot_seeds(axes[1], row["runs"], "epoch", lambda h: 100 * h["val_acc"], label, color)
    axes[0].set_ylabel("training loss")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("validation accuracy (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    seeds = [r["seed"] for r in rows[0]["runs"]]
    axes[0].set_title(f"digits, mean over seeds {seeds}" if len(seeds) > 1 else f"digits, seed {seeds[0]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True




def fingerprint(args) -> Dict:
    """The code's fingerprint for this command's table (see examples/_common.py): every model of the
    table at its width, seed 0, a few AdamW steps on the first --batch-size training images."""
    from torch_geometric.data import Batch
    batch = Batch.from_data_list(load_splits(args.split_seed, args.patch_size, args.batch_size)["train"])
    losses = {}
    for kind in args.models:
        for sharing in (args.sharings if kind == "grid" else [None]):
            width = width_for_budget(kind, args, sharing)
            torch.manual_seed(0)
            model = build(kind, width, args, sharing)
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
            losses[kind + (f"/{sharing}" if sharing else "")] = fingerprint_losses(
                model, optimizer, lambda: F.cross_entropy(model(batch), batch.y), clip=1.0)
    return fingerprint_record("examples/images.py", without_options(args.argv, ("--fingerprint-only", "--threads")),
                              batch.num_graphs, losses)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    note_threads_of_this_process(args.threads)
    if 8 % args.patch_size:
        raise SystemExit(f"--patch-size must divide 8, got {args.patch_size}")
    only, recorded_fingerprint = fingerprint_first(args, "examples/images.py", fingerprint)
    if only is not None:
        return only
    device = resolve_device(args.device)
    splits = load_splits(args.split_seed, args.patch_size, args.limit)
    print("digits: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
          + f" images, {splits['train'][0].num_nodes} patches of {args.patch_size}x{args.patch_size} each")
    rows = []
    for kind in args.models:
        for sharing in (args.sharings if kind == "grid" else [None]):
            width = width_for_budget(kind, args, sharing)
            params = count_parameters(build(kind, width, args, sharing))
            print(f"{TITLES[kind]}{f' sharing={sharing}' if sharing else ''}: width {width}, {params:,} parameters")
            runs = [train_one(kind, sharing, width, seed, splits, args, device) for seed in args.seed_list]
            print("  test acc. " + ", ".join(f"{100 * r['best']['test_acc']:.1f}" for r in runs)
                  + f" ({sum(r['seconds'] for r in runs):.0f} s)")
            rows.append({"model": kind, "title": TITLES[kind], "sharing": sharing, "width": width, "params": params,
                         "runs": runs, "test_acc_mean": sum(r["best"]["test_acc"] for r in runs) / len(runs)})
    report = table(rows, args.budget)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_description(device)
    print(f"\nDigits, test accuracy at the best validation epoch, mean ± std over seeds {args.seed_list} "
          f"({device}; {machine}; {stamp}):\n")
    print(report)
    summary = {"args": {k: v for k, v in vars(args).items()}, "device": str(device), "machine": machine,
               "date": stamp, "split": dict(zip(("train", "val", "test"), (len(v) for v in splits.values()))),
               "table": report, "results": rows}
    tag = args.tag or device.type
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"images_{tag}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nsaved {path}")
    png = os.path.join(args.out, f"images_{tag}.png")
    if plot(rows, png):
        print(f"saved {png}")
    if args.record is not None:
        record_result(summary, "examples/images.py", args.argv, record_paths(args.record, f"images_{tag}"), png,
                      recorded_fingerprint)
    return summary


if __name__ == "__main__":
    main()
