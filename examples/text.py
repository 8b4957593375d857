"""Text as graphs: byte-level masked language modelling on CPython's documentation (Table 7's shape).

The text is ``pydoc_data.topics`` (the reference documentation behind ``help()``, about 465 KB of
English and code that ships with every CPython), UTF-8 bytes of its topics in sorted order. It is
cut into non-overlapping windows of --length bytes; the first 90% of the windows train, the next
5% validate and the last 5% test (contiguous blocks, so no held-out byte sits in a training
window). Every window becomes its line graph (``SequenceToLine``) and four models, at an equal
parameter budget, fill in masked bytes:

    undirected  Chimera on the undirected line graph, one resolvent with App. B.1's weights
                (adjacency="undirected_line": A_ij = exp(-(Δ_i + Δ_j)/3) / 2, so A_ij A_ji ≤ 1/4)
    line        Chimera on the two directed lines, summed (decomposition="line", Fig. 2)
    hydra       Hydra's bidirectional mixer: both lines, each output shifted by one token, plus a
                data-dependent diagonal term (decomposition="hydra")
    fwd         Chimera on the forward line alone (decomposition="fwd": causal, Mamba-2)
    bert        a BERT-style Transformer encoder (bidirectional attention, learned positions)

Masking is BERT's: 15% of the bytes are chosen; of those 80% become [MASK], 10% a random byte
and 10% stay; the loss is the cross-entropy on the chosen bytes. The held-out masks are drawn
once from a fixed seed, so every model is scored on the same bytes.

Every model is the same pre-norm stack, only the token mixer differs: a byte embedding (256 bytes
and [MASK]) plus learned position embeddings (--pos-emb), --layers blocks of [LayerNorm, mixer,
dropout, residual; LayerNorm, MLP (GELU, 2x width), dropout, residual], a final LayerNorm and a
linear read-out to the 256 bytes. The width of each model is the largest one whose parameter
count fits --budget. Training: AdamW, a fixed budget of --steps steps of --batch-size windows,
linear warmup over --warmup steps then cosine decay to 0, gradient norm clipped at 1; every
--eval-every steps the validation cross-entropy is measured, and the weights with the lowest one
are scored on the test windows: masked accuracy and cross-entropy (nats per masked byte).

    python examples/text.py                          # the table in the README
    python examples/text.py --model line,bert --seeds 0,1,2 --steps 1000
    python examples/text.py --record                 # refresh benchmarks/results/text_cpu.json

The JSON log and the plot go to --out (runs/text/); only --record writes the recorded results in
benchmarks/results/, with the code's fingerprint (--fingerprint-only) that tests/test_readme.py
compares with the code's.
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
from torch_geometric_chimera.transforms import SequenceToLine

from _common import (Block, HelpFormatter, add_run_arguments, count_parameters, fingerprint_first,  # noqa: E402
                     fingerprint_losses, fingerprint_record, machine_description, mean_std,
                     note_threads_of_this_process, plot_seeds, pyplot, record_paths, record_result, resolve_device,
                     warmup_cosine, without_options)
from _common import tqdm  # noqa: E402  (optional: a plain iterator without it)
from _common import width_for_budget as shared_width_for_budget  # noqa: E402

MODELS = ("undirected", "line", "hydra", "fwd", "bert")
TITLES = {"undirected": "Chimera (undirected line, B.1)", "line": "Chimera (two directed lines)",
          "hydra": "Hydra-style (shifted fwd + rev, diagonal)", "fwd": "Fwd only (causal)", "bert": "BERT (learned positions)"}
MASK = 256  # the [MASK] token; bytes are 0..255
EVAL_MASK_SEED = 12345


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="all", help=f"comma list of {list(MODELS)} or 'all'")
    parser.add_argument("--pos-emb", default="learned", choices=("learned", "none"),
                        help="position embeddings added to the byte embeddings of every model")
    parser.add_argument("--seeds", default="0", help="comma list of training seeds")
    parser.add_argument("--length", type=int, default=64, help="bytes per window (nodes per line graph)")
    parser.add_argument("--mask-prob", type=float, default=0.15, help="fraction of bytes chosen for the loss")
    parser.add_argument("--budget", type=int, default=50_000, help="parameter budget of every model")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4, help="SSM heads of Chimera, attention heads of BERT")
    parser.add_argument("--state-dim", type=int, default=16, help="state size S of Chimera's B and C")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=300, help="training steps (the fixed budget)")
    parser.add_argument("--warmup", type=int, default=30, help="steps of linear learning-rate warmup")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between validation passes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--limit", type=int, default=None, help="use the first N windows of each split (smoke runs)")
    add_run_arguments(parser, "text")
    args = parser.parse_args(argv)
    args.models = list(MODELS) if args.model == "all" else args.model.split(",")
    for name in args.models:
        if name not in MODELS:
            parser.error(f"--model: expected names from {list(MODELS)}, got {name!r}")
    if args.length < 2:
        parser.error(f"--length: expected at least 2 bytes per window, got {args.length}")
    if not 0.0 < args.mask_prob < 1.0:
        parser.error(f"--mask-prob: expected a fraction in (0, 1), got {args.mask_prob}")
    if args.heads < 1 or args.layers < 1 or args.budget < 1 or args.steps < 1 or args.eval_every < 1:
        parser.error("--heads, --layers, --budget, --steps and --eval-every must be positive")
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


# ----------------------------------------------------------------------------- data
def load_text() -> bytes:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")


def load_splits(length: int, limit: Optional[int] = None) -> Dict[str, List[Data]]:
    """Windows of ``length`` bytes as line graphs, split 90/5/5 in contiguous blocks."""
    data = torch.frombuffer(bytearray(load_text()), dtype=torch.uint8).long()
    windows = data[:data.numel() // length * length].view(-1, length)
    num_val = num_test = max(1, len(windows) // 20)
    num_train = len(windows) - num_val - num_test
    bounds = {"train": (0, num_train), "val": (num_train, num_train + num_val),
              "test": (num_train + num_val, len(windows))}
    transform = SequenceToLine(directed=False)
    splits = {}
    for name, (start, stop) in bounds.items():
        stop = stop if limit is None else min(stop, start + limit)
        splits[name] = [transform(Data(x=windows[i])) for i in range(start, stop)]
    return splits


def bert_mask(tokens: Tensor, prob: float, generator: torch.Generator):
    """BERT's masking of a byte tensor: ``(inputs, chosen)``; ``chosen`` marks the bytes to predict."""
    rand = torch.rand(tokens.shape, generator=generator)
    chosen = rand < prob
    if not chosen.any():  # at least one target per batch
        chosen[torch.randint(tokens.numel(), (1,), generator=generator)] = True
    action = torch.rand(tokens.shape, generator=generator)
    inputs = tokens.clone()
    inputs[chosen & (action < 0.8)] = MASK
    random_bytes = torch.randint(256, tokens.shape, generator=generator)
    swap = chosen & (action >= 0.8) & (action < 0.9)
    inputs[swap] = random_bytes[swap]
    return inputs, chosen


def fixed_eval_masks(split: List[Data], prob: float) -> List[Data]:
    """The held-out windows with masks drawn once, the same for every model and seed."""
    generator = torch.Generator().manual_seed(EVAL_MASK_SEED)
    out = []
    for data in split:
        inputs, chosen = bert_mask(data.x, prob, generator)
        out.append(Data(x=inputs, target=data.x, chosen=chosen, edge_index=data.edge_index, pos=data.pos,
                        seq_len=data.seq_len, num_nodes=data.num_nodes))
    return out


# ----------------------------------------------------------------------------- models
class Mixer(nn.Module):
    """The token mixer of one block: a ``ChimeraConv`` on the line graph, or self-attention."""

    def __init__(self, kind: str, width: int, heads: int, state_dim: int, dropout: float):
        super().__init__()
        self.kind = kind
        if kind == "bert":
            self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        elif kind == "undirected":
            # One resolvent on the undirected line graph itself (SequenceToLine's edges).
            self.conv = ChimeraConv(width, heads=heads, state_dim=state_dim, adjacency="undirected_line")
        else:
            self.conv = ChimeraConv(width, heads=heads, state_dim=state_dim, decomposition=kind)

    def forward(self, x: Tensor, data) -> Tensor:
        if self.kind == "bert":
            dense, mask = to_dense_batch(x, data.batch)
            out = self.attn(dense, dense, dense, key_padding_mask=~mask, need_weights=False)[0]
            return out[mask]
        if self.kind == "undirected":
            return self.conv(x, data.edge_index, batch=data.batch)
        return self.conv(x, data.edge_index, batch=data.batch, seq_len=data.seq_len)




class ByteMLM(nn.Module):
    """Byte embedding (+ learned position embedding), ``layers`` blocks, read-out to 256 bytes."""

    def __init__(self, kind: str, length: int, width: int, layers: int, heads: int, state_dim: int,
                 dropout: float = 0.1, pos_emb: str = "learned"):
        super().__init__()
        self.embed = nn.Embedding(257, width)  # 256 bytes and [MASK]
        self.pos = nn.Embedding(length, width) if pos_emb == "learned" else None
        for emb in (self.embed, self.pos):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(Mixer(kind, width, heads, state_dim, dropout), width, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)

    def forward(self, data, chosen: Optional[Tensor] = None) -> Tensor:
        """Logits ``[N, 256]``, or only at the ``chosen`` nodes."""
        x = self.embed(data.x)
        if self.pos is not None:  # SequenceToLine's position of every byte
            x = x + self.pos(data.pos[:, 0].long())
        for block in self.blocks:
            x = block(x, data)
        x = self.norm(x)
        return self.head(x if chosen is None else x[chosen])




def build(kind: str, width: int, args) -> ByteMLM:
    return ByteMLM(kind, args.length, width, args.layers, args.heads, args.state_dim, args.dropout, args.pos_emb)


def width_for_budget(kind: str, args) -> int:
    return shared_width_for_budget(lambda width: build(kind, width, args), kind == "bert", args.heads, args.budget, kind)


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model, split: List[Data], device) -> Dict[str, float]:
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for data in DataLoader(split, batch_size=64):
        data = data.to(device)
        logits = model(data, data.chosen)
        target = data.target[data.chosen]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    return {"ce": loss / max(count, 1), "acc": correct / max(count, 1), "targets": count}


def train_one(kind: str, width: int, seed: int, splits, args, device) -> Dict:
    torch.manual_seed(seed)
    model = build(kind, width, args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_cosine(optimizer, args.warmup, args.steps)
    masking = torch.Generator().manual_seed(seed)
    history, best, best_state = [], None, None
    start, step, running, seen = time.perf_counter(), 0, 0.0, 0
    bar = tqdm(total=args.steps, desc=f"{kind} seed {seed}", disable=args.quiet, leave=False)
    epoch = 0
    while step < args.steps:
        epoch += 1
        loader = DataLoader(splits["train"], batch_size=args.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for data in loader:
            model.train()
            inputs, chosen = bert_mask(data.x, args.mask_prob, masking)
            target = data.x[chosen]
            data.x = inputs
            data, chosen, target = data.to(device), chosen.to(device), target.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data, chosen), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            running, seen = running + loss.item(), seen + 1
            bar.update(1)
            if step % args.eval_every == 0 or step == args.steps:
                val = evaluate(model, splits["val"], device)
                record = {"step": step, "train_ce": running / seen, "val_ce": val["ce"], "val_acc": val["acc"],
                          "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - start}
                history.append(record)
                running, seen = 0.0, 0
                if best is None or val["ce"] < best["val_ce"]:
                    best = {"step": step, "val_ce": val["ce"], "val_acc": val["acc"]}
                    best_state = copy.deepcopy(model.state_dict())
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(train=f"{record['train_ce']:.3f}", val=f"{val['ce']:.3f}")
            if step == args.steps:
                break
    bar.close()
    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    test = evaluate(model, splits["test"], device)
    best.update(test_ce=test["ce"], test_acc=test["acc"], test_targets=test["targets"])
    return {"seed": seed, "best": best, "history": history, "seconds": seconds}


# ----------------------------------------------------------------------------- reporting
def table(rows: List[Dict], budget: int) -> str:
    lines = [f"| Model (≤ {budget / 1000:g}k params) | params | width | masked acc. (%) | cross-entropy (nats) "
             f"| val CE | s / seed |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        runs = row["runs"]
        lines.append(f"| {TITLES[row['model']]} | {row['params']:,} | {row['width']} "
                     f"| {mean_std([r['best']['test_acc'] for r in runs], 100, 1)} "
                     f"| {mean_std([r['best']['test_ce'] for r in runs], digits=3)} "
                     f"| {mean_std([r['best']['val_ce'] for r in runs], digits=3)} "
                     f"| {sum(r['seconds'] for r in runs) / len(runs):.0f} |")
    return "\n".join(lines)


def plot(rows: List[Dict], path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        color = plot_seeds(axes[0], row["runs"], "step", lambda h: h["train_ce"], TITLES[row["model"]])
        plot_seeds(axes[1], row["runs"], "step", lambda h: h["val_ce"], TITLES[row["model"]], color)
    axes[0].set_ylabel("training cross-entropy (masked bytes)")
    axes[1].set_ylabel("validation cross-entropy (masked bytes)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    seeds = [r["seed"] for r in rows[0]["runs"]]
    axes[0].set_title(f"pydoc_data.topics MLM, mean over seeds {seeds}" if len(seeds) > 1
                      else f"pydoc_data.topics MLM, seed {seeds[0]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True




def fingerprint(args) -> Dict:
    """The code's fingerprint for this command's table (see examples/_common.py): every model of the
    table at its width, seed 0, a few AdamW steps on the first --batch-size training windows, masked
    once with the generator of seed 0."""
    from torch_geometric.data import Batch
    batch = Batch.from_data_list(load_splits(args.length, args.batch_size)["train"])
    inputs, chosen = bert_mask(batch.x, args.mask_prob, torch.Generator().manual_seed(0))
    target = batch.x[chosen]
    batch.x = inputs
    losses = {}
    for kind in args.models:
        width = width_for_budget(kind, args)
        torch.manual_seed(0)
        model = build(kind, width, args)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        losses[kind] = fingerprint_losses(model, optimizer, lambda: F.cross_entropy(model(batch, chosen), target),
                                          clip=1.0)
    return fingerprint_record("examples/text.py", without_options(args.argv, ("--fingerprint-only", "--threads")),
                              batch.num_graphs, losses)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    note_threads_of_this_process(args.threads)
    only, recorded_fingerprint = fingerprint_first(args, "examples/text.py", fingerprint)
    if only is not None:
        return only
    device = resolve_device(args.device)
    splits = load_splits(args.length, args.limit)
    for name in ("val", "test"):
        splits[name] = fixed_eval_masks(splits[name], args.mask_prob)
    print("pydoc_data.topics: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
          + f" windows of {args.length} bytes")
    rows = []
    for kind in args.models:
        width = width_for_budget(kind, args)
        params = count_parameters(build(kind, width, args))
        print(f"{TITLES[kind]}: width {width}, {params:,} parameters")
        runs = [train_one(kind, width, seed, splits, args, device) for seed in args.seed_list]
        print("  test masked acc. " + ", ".join(f"{100 * r['best']['test_acc']:.1f}" for r in runs)
              + ", CE " + ", ".join(f"{r['best']['test_ce']:.3f}" for r in runs)
              + f" ({sum(r['seconds'] for r in runs):.0f} s)")
        rows.append({"model": kind, "title": TITLES[kind], "width": width, "params": params, "runs": runs})
    report = table(rows, args.budget)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_description(device)
    print(f"\nByte-level MLM on pydoc_data.topics, test split at the best validation step, mean ± std over seeds "
          f"{args.seed_list} ({device}; {machine}; {stamp}):\n")
    print(report)
    summary = {"args": dict(vars(args)), "device": str(device), "machine": machine, "date": stamp,
               "split": {k: len(v) for k, v in splits.items()}, "table": report, "results": rows}
    tag = args.tag or device.type
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"text_{tag}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nsaved {path}")
    png = os.path.join(args.out, f"text_{tag}.png")
    if plot(rows, png):
        print(f"saved {png}")
    if args.record is not None:
        record_result(summary, "examples/text.py", args.argv, record_paths(args.record, f"text_{tag}"), png,
                      recorded_fingerprint)
    return summary


if __name__ == "__main__":
    main()
