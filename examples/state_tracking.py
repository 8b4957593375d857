"""State tracking: parity along sequences and down trees, positive against signed transitions (issue 18).

Grazzi et al. (ICLR 2025, "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues")
prove that a linear RNN whose transitions lie in [0, 1], as Mamba's exp(-Δ) does, cannot compute
parity, and that transitions in [-1, 1] can: a token 1 flips the state's sign, a token 0 keeps it.
Chimera's edge weights are exp(-Δ) on every topology; ChimeraConv(..., transitions="signed") makes
them 2 exp(-Δ) - 1. Two tasks test whether that carries over, each at an equal parameter budget
(every model gets the largest width that fits --budget), over --seeds:

parity on sequences (models seq/...): uniformly random bit strings; the model reads the string
left to right and predicts, at every token, the parity of the prefix that ends there (as Grazzi et
al. train: a target at every token, not one per string, so that a few hundred steps on a CPU
suffice). Training strings have lengths --train-lengths (3-40); the test
strings are longer (--test-lengths, 41-256), and the score is the accuracy of the parity of the
whole string (the prediction at the last token), per length bucket (--length-buckets).

    positive     Chimera, decomposition="fwd" (the forward line: causal, Mamba-2), exp(-Δ)
    signed       the same with transitions="signed", 2 exp(-Δ) - 1
    transformer  a causal Transformer (GPT-style decoder) with sinusoidal positions: causal because the
                 per-prefix targets are causal and the two SSMs are; sinusoidal positions because they
                 exist at every length (learned positions have no embedding past the training length
                 40, and the SSMs need no positions at all)

parity down a tree (models tree/...): random rooted trees of --tree-nodes nodes (20-60) with a random
bit per node; every node's label is the parity of the bits on its path from the root (both ends
included). A tree of depth d (drawn uniformly from its range) is a path of d edges from the root,
then every further node hangs under a uniformly drawn node of depth below d; its node ids are
shuffled. Training trees have depth 1 to --train-depth; the test trees are deeper (depth > --train-depth,
--test-per-bucket trees in each bucket of --depth-buckets) and the score is the node accuracy per
bucket of the node's own depth. Every model sees the root-to-leaf edges (parent -> child) only: the
label depends on the ancestors, and undirected edges would hide which neighbour is the parent.

    positive     Chimera, adjacency="dag" on the parent -> child edges, exp(-Δ)
    signed       the same with transitions="signed"
    signed-child the same with adjacency="mamba2": every edge j -> i weighs 2 exp(-Δ_i) - 1, the child's
                 own Δ, where "dag" averages the two ends' (Δ_ij = (Δ_i + Δ_j) / 2), so that a parent whose
                 bit flips its own sign also pulls its children's edges towards -1 (the diagnostic row)
    gcn, gin     PyG's GCNConv / GINConv with as many layers as the deepest training tree (a node then
                 hears from every ancestor of a training tree)
    gps          PyG's GPSConv (GINConv on the edges + multi-head attention), as many layers as the GIN,
                 with random-walk structural encodings (RWSE of the undirected tree, --rwse steps, as PyG's
                 AddRandomWalkPE computes them) as GraphGPS uses

Every model is the same pre-norm stack, only the mixer differs: an embedding of the bit (plus the
Transformer's positions, or GPS's encodings), blocks of [LayerNorm, mixer, dropout, residual;
LayerNorm, MLP (GELU, 2x width), dropout, residual] (GPSConv brings its own residuals, norms and MLP),
a final LayerNorm and a linear read-out to the two classes at every node. Chimera and the Transformer
have --layers blocks (one by default: with two, every seed fits the training lengths but fewer carry
the rule to 256); GCN, GIN and GPS have as many as the deepest training tree. Every Chimera layer
starts its Δ log-uniform in --dt-range 0.001,1 (Mamba-2's 0.001,0.1 starts every transition near 1;
in our sweep the signed layer then learned the training lengths in one seed of three, against three
of three from 0.001,1). The learning rate is 1e-2 for every model: at 3e-3 one seed of three of the
signed sequence model never left chance, even in 1,200 steps. Training: AdamW
(--lr, --weight-decay 0), --steps steps of --batch-size strings or trees from a fixed training set
(--train-size, drawn once from --data-seed), linear warmup over --warmup steps then cosine decay to
0, gradient norm clipped at 1; every --eval-every steps the accuracy on --val-size held-out strings or
trees of the training distribution is logged. The scores are those of the final weights (the test
lengths and depths play no part in training or selection), mean ± std (population) over --seeds.

    python examples/state_tracking.py                          # the tables in the README
    python examples/state_tracking.py --model seq              # parity on sequences alone
    python examples/state_tracking.py --model seq/signed,tree/signed --seeds 0 --steps 200
    python examples/state_tracking.py --smoke                  # a few steps on a few examples
    python examples/state_tracking.py --record                 # refresh benchmarks/results/state_tracking_cpu.json

The JSON log and the plot go to --out (runs/state_tracking/state_tracking_<tag>.json and .png, <tag>
the device type unless --tag says otherwise); only --record writes the recorded
results in benchmarks/results/, with the code's fingerprint (--fingerprint-only) that
tests/test_readme.py compares with the code's. matplotlib (the plot) and tqdm (progress bars) are
optional.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples/_threads.py, examples/_common.py
from _threads import pin_threads  # noqa: E402

if __name__ == "__main__":
    pin_threads(sys.argv[1:], default=None)  # before torch starts: see examples/_threads.py

import torch  # noqa: E402  (after the thread count is in the environment)
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn import GCNConv, GINConv, GPSConv
from torch_geometric.utils import to_dense_batch

from torch_geometric_chimera.nn import ChimeraConv
from torch_geometric_chimera.transforms import SequenceToLine

from _common import (Block, HelpFormatter, add_run_arguments, count_parameters, fingerprint_first,  # noqa: E402
                     fingerprint_losses, fingerprint_record, machine_description, mean_std,
                     note_threads_of_this_process, plot_seeds, pyplot, record_paths, record_result, resolve_device,
                     warmup_cosine, without_options)
from _common import tqdm  # noqa: E402  (optional: a plain iterator without it)
from _common import width_for_budget as shared_width_for_budget  # noqa: E402

TASKS = ("seq", "tree")
MODELS = ("seq/positive", "seq/signed", "seq/transformer",
          "tree/positive", "tree/signed", "tree/signed-child", "tree/gcn", "tree/gin", "tree/gps")
TITLES = {"seq/positive": "Chimera fwd, positive (exp(-Δ))", "seq/signed": "Chimera fwd, signed (2exp(-Δ)-1)",
          "seq/transformer": "Transformer (causal, sinusoidal positions)",
          "tree/positive": "Chimera dag, positive (exp(-Δ))", "tree/signed": "Chimera dag, signed (2exp(-Δ)-1)",
          "tree/signed-child": "Chimera mamba2 (child's Δ), signed",
          "tree/gcn": "GCN", "tree/gin": "GIN", "tree/gps": "GPS (GIN + attention, RWSE)"}
TASK_TITLES = {"seq": "parity on sequences", "tree": "parity down a tree"}
VAL_SEED_OFFSET, TEST_SEED_OFFSET = 1, 2  # the held-out sets: --data-seed + offset
SMOKE = ["--seeds", "0", "--steps", "3", "--warmup", "1", "--eval-every", "2", "--batch-size", "4",
         "--train-size", "16", "--val-size", "8", "--test-per-bucket", "2", "--budget", "6000",
         "--train-lengths", "3,12", "--test-lengths", "13,40", "--length-buckets", "13,24,40",
         "--tree-nodes", "8,16", "--train-depth", "3", "--depth-buckets", "4,8,15", "--rwse", "4"]


def int_pair(text: str, name: str) -> Tuple[int, int]:
    low, high = (int(v) for v in text.split(","))
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"{name}: expected 'low,high' with 1 <= low <= high, got {text!r}")
    return low, high


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="all",
                        help=f"comma list of {list(MODELS)}, 'seq' or 'tree' (every model of that task), or 'all'")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of training seeds")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="seed of the training set; the validation and test sets use the next two seeds")
    parser.add_argument("--budget", type=int, default=20_000, help="parameter budget of every model")
    parser.add_argument("--layers", type=int, default=1, help="blocks of the Chimera models and the Transformer")
    parser.add_argument("--heads", type=int, default=4, help="SSM heads of Chimera, attention heads of the "
                                                             "Transformer and GPS")
    parser.add_argument("--state-dim", type=int, default=16, help="state size S of Chimera's B and C")
    parser.add_argument("--dt-range", default="0.001,1",
                        help="initial range of every Chimera layer's selectivity Δ, 'min,max' (Mamba-2's is 0.001,0.1)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=600, help="training steps (the fixed budget)")
    parser.add_argument("--warmup", type=int, default=60, help="steps of linear learning-rate warmup")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between validation passes")
    parser.add_argument("--batch-size", type=int, default=32, help="strings or trees per step")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--train-size", type=int, default=4096, help="training strings / trees (drawn once)")
    parser.add_argument("--val-size", type=int, default=256, help="held-out strings / trees of the training "
                                                                  "distribution, scored every --eval-every steps")
    parser.add_argument("--test-per-bucket", type=int, default=128,
                        help="test strings per length bucket, test trees per depth bucket")
    # sequences
    parser.add_argument("--train-lengths", default="3,40", help="'low,high': training string lengths")
    parser.add_argument("--test-lengths", default="41,256", help="'low,high': test string lengths")
    parser.add_argument("--length-buckets", default="41,64,96,128,192,256",
                        help="test length buckets: edges e0,e1,...: lengths e0..e1, e1+1..e2, ...")
    # trees
    parser.add_argument("--tree-nodes", default="20,60", help="'low,high': nodes per tree")
    parser.add_argument("--train-depth", type=int, default=8, help="largest depth of a training tree")
    parser.add_argument("--depth-buckets", default="9,16,24,32,59",
                        help="depths of the test trees, as bucket edges e0,e1,...: e0 > --train-depth; a node's "
                             "depth is scored in the bucket it falls in (depths up to --train-depth form one "
                             "more bucket)")
    parser.add_argument("--rwse", type=int, default=8, help="random-walk steps of GPS's structural encoding")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps on a few small examples, every model (options given after it win)")
    # A short --out help: its default stays on one line of --help.
    add_run_arguments(parser, "state_tracking", out_help="output folder")
    raw = list(sys.argv[1:] if argv is None else argv)
    # --smoke: its options first, so that the ones given on the command line override them.
    args = parser.parse_args((SMOKE if "--smoke" in raw else []) + raw)
    args.argv = raw
    if args.model == "all":
        args.models = list(MODELS)
    else:
        args.models = []
        for name in args.model.split(","):
            names = [m for m in MODELS if m.startswith(name + "/")] if name in TASKS else [name]
            if not all(n in MODELS for n in names):
                parser.error(f"--model: expected names from {list(MODELS)}, 'seq', 'tree' or 'all', got {name!r}")
            args.models += [n for n in names if n not in args.models]
    try:
        args.train_range = int_pair(args.train_lengths, "--train-lengths")
        args.test_range = int_pair(args.test_lengths, "--test-lengths")
        args.node_range = int_pair(args.tree_nodes, "--tree-nodes")
    except (argparse.ArgumentTypeError, ValueError) as error:
        parser.error(str(error))
    args.length_edges = [int(v) for v in args.length_buckets.split(",")]
    args.depth_edges = [int(v) for v in args.depth_buckets.split(",")]
    if args.train_range[0] < 2:
        parser.error("--train-lengths: strings of at least 2 bits")
    if args.test_range[0] <= args.train_range[1]:
        parser.error("--test-lengths: the test strings must be longer than every training string")
    if (len(args.length_edges) < 2 or args.length_edges != sorted(set(args.length_edges))
            or args.length_edges[0] != args.test_range[0] or args.length_edges[-1] != args.test_range[1]):
        parser.error("--length-buckets: increasing edges from the shortest to the longest test length")
    if args.train_depth < 1 or args.train_depth >= args.node_range[1] - 1:
        parser.error("--train-depth: at least 1 and below the largest tree's nodes - 1")
    if (len(args.depth_edges) < 2 or args.depth_edges != sorted(set(args.depth_edges))
            or args.depth_edges[0] != args.train_depth + 1 or args.depth_edges[-1] > args.node_range[1] - 1):
        parser.error(f"--depth-buckets: increasing edges from --train-depth + 1 = {args.train_depth + 1} to at most "
                     f"the deepest possible tree ({args.node_range[1] - 1})")
    for name in ("heads", "layers", "budget", "steps", "eval_every", "batch_size", "train_size", "val_size",
                 "test_per_bucket", "rwse"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.dt_min, args.dt_max = (float(v) for v in args.dt_range.split(","))
    return args


# ----------------------------------------------------------------------------- data
def length_buckets(edges: List[int]) -> List[Tuple[int, int]]:
    """Bucket edges ``e0, e1, e2, ...`` as ranges ``(e0, e1), (e1 + 1, e2), ...`` (both ends included)."""
    return [(edges[0], edges[1])] + [(edges[k] + 1, edges[k + 1]) for k in range(1, len(edges) - 1)]


def depth_buckets(args) -> List[Tuple[int, int]]:
    """The node-depth buckets of the table: the training depths, then --depth-buckets."""
    return [(0, args.train_depth)] + length_buckets(args.depth_edges)


def parity_string(length: int, generator: torch.Generator) -> Data:
    """A random bit string as its directed line graph; ``y``: the parity of every prefix."""
    bits = torch.randint(2, (length,), generator=generator)
    data = SequenceToLine(directed=True)(Data(x=bits))
    data.y = bits.cumsum(0) % 2
    return data


def parity_strings(count: int, lengths: Tuple[int, int], generator: torch.Generator) -> List[Data]:
    sizes = torch.randint(lengths[0], lengths[1] + 1, (count,), generator=generator)
    return [parity_string(int(n), generator) for n in sizes]


def sequence_splits(args) -> Dict[str, List[Data]]:
    """Training and held-out strings of the training lengths, and ``--test-per-bucket`` strings per test
    length bucket (``test``, bucket by bucket; each string's length is its ``seq_len``)."""
    seed = args.data_seed
    test = []
    generator = torch.Generator().manual_seed(seed + TEST_SEED_OFFSET)
    for bucket in length_buckets(args.length_edges):
        test += parity_strings(args.test_per_bucket, bucket, generator)
    return {"train": parity_strings(args.train_size, args.train_range, torch.Generator().manual_seed(seed)),
            "val": parity_strings(args.val_size, args.train_range,
                                  torch.Generator().manual_seed(seed + VAL_SEED_OFFSET)),
            "test": test}


def random_tree(nodes: Tuple[int, int], depths: Tuple[int, int], rng: random.Random) -> Data:
    """A random rooted tree: a depth ``d`` drawn from ``depths``, a node count from ``nodes`` (at least
    ``d + 1``); a path of ``d`` edges from the root, then every further node hung under a uniformly drawn
    node of depth below ``d`` (so the tree's depth is exactly ``d``). A random bit per node; ``y``: every
    node's root-path parity (both ends included); ``depth``: every node's depth; edges parent -> child;
    node ids shuffled."""
    depth = rng.randint(*depths)
    num_nodes = rng.randint(max(nodes[0], depth + 1), max(nodes[1], depth + 1))
    parent, level = [-1] + list(range(depth)), list(range(depth + 1))
    open_nodes = list(range(depth))  # the nodes that can take a child
    for k in range(depth + 1, num_nodes):
        p = rng.choice(open_nodes)
        parent.append(p)
        level.append(level[p] + 1)
        if level[k] < depth:
            open_nodes.append(k)
    bits = [rng.randint(0, 1) for _ in range(num_nodes)]
    parity = list(bits)
    for k in range(1, num_nodes):  # parents come first: the parity of the parent's path is known
        parity[k] = parity[parent[k]] ^ bits[k]
    order = list(range(num_nodes))
    rng.shuffle(order)  # new id of node k: order[k]
    new = [0] * num_nodes
    for k, o in enumerate(order):
        new[o] = k  # the node now at id o
    edge_index = torch.tensor([[order[parent[k]] for k in range(1, num_nodes)], order[1:]], dtype=torch.long)
    return Data(x=torch.tensor([bits[k] for k in new]), y=torch.tensor([parity[k] for k in new]),
                depth=torch.tensor([level[k] for k in new]), edge_index=edge_index.view(2, -1), num_nodes=num_nodes)


def add_random_walk_encodings(trees: List[Data], steps: int, chunk: int = 512):
    """GraphGPS's RWSE on every undirected tree, as ``rwse`` (``[N, steps]``): the probability that a random
    walk of ``k`` steps returns to its start, ``k = 1 .. steps``, as PyG's AddRandomWalkPE computes it,
    here for many trees at once (padded dense matrices)."""
    for first in range(0, len(trees), chunk):
        group = trees[first:first + chunk]
        size = max(t.num_nodes for t in group)
        adjacency = torch.zeros(len(group), size, size)
        for g, tree in enumerate(group):
            adjacency[g, tree.edge_index[0], tree.edge_index[1]] = 1.0
            adjacency[g, tree.edge_index[1], tree.edge_index[0]] = 1.0
        walk = adjacency / adjacency.sum(2, keepdim=True).clamp_min(1)
        power, out = walk, []
        for _ in range(steps):
            out.append(power.diagonal(dim1=1, dim2=2))
            power = power @ walk
        encoding = torch.stack(out, -1)
        for g, tree in enumerate(group):
            tree.rwse = encoding[g, :tree.num_nodes].clone()


def random_trees(count: int, nodes: Tuple[int, int], depths: Tuple[int, int], rng: random.Random,
                 rwse: int) -> List[Data]:
    trees = [random_tree(nodes, depths, rng) for _ in range(count)]
    add_random_walk_encodings(trees, rwse)
    return trees


def tree_splits(args) -> Dict[str, List[Data]]:
    """Training and held-out trees of depth at most --train-depth, and --test-per-bucket deeper trees
    per bucket of --depth-buckets (``test``)."""
    seed, nodes, train_depths = args.data_seed, args.node_range, (1, args.train_depth)
    test = []
    rng = random.Random(seed + TEST_SEED_OFFSET)
    for bucket in length_buckets(args.depth_edges):
        test += random_trees(args.test_per_bucket, nodes, bucket, rng, args.rwse)
    return {"train": random_trees(args.train_size, nodes, train_depths, random.Random(seed), args.rwse),
            "val": random_trees(args.val_size, nodes, train_depths, random.Random(seed + VAL_SEED_OFFSET), args.rwse),
            "test": test}


def load_splits(task: str, args) -> Dict[str, List[Data]]:
    return sequence_splits(args) if task == "seq" else tree_splits(args)


def deepest(trees: List[Data]) -> int:
    return max(int(t.depth.max()) for t in trees)


# ----------------------------------------------------------------------------- models
def sinusoidal(positions: Tensor, width: int) -> Tensor:
    """The Transformer's sine/cosine position encoding of ``positions`` (``[N]``), ``[N, width]``."""
    half = (width + 1) // 2
    freq = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angle = positions.float().unsqueeze(-1) * freq
    return torch.cat([angle.sin(), angle.cos()], -1)[:, :width]


class Mixer(nn.Module):
    """The mixer of one block: a ChimeraConv (on the forward line or the tree), causal self-attention,
    GCNConv or GINConv."""

    def __init__(self, kind: str, width: int, heads: int, state_dim: int, dropout: float,
                 dt_range: Tuple[float, float] = (0.001, 0.1)):
        super().__init__()
        self.task, self.kind = kind.split("/")
        if self.kind in ("positive", "signed", "signed-child"):
            options = (dict(decomposition="fwd") if self.task == "seq" else
                       dict(adjacency="mamba2") if self.kind == "signed-child" else dict(adjacency="dag"))
            self.conv = ChimeraConv(width, heads=heads, state_dim=state_dim, transitions=self.kind.split("-")[0],
                                    dt_min=dt_range[0], dt_max=dt_range[1], **options)
        elif self.kind == "transformer":
            self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        elif self.kind == "gcn":
            self.conv = GCNConv(width, width)
        elif self.kind == "gin":
            self.conv = GINConv(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)))
        else:
            raise ValueError(f"no mixer {kind!r}")

    def forward(self, x: Tensor, data) -> Tensor:
        if self.kind == "transformer":
            dense, mask = to_dense_batch(x, data.batch)
            length = dense.size(1)
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            out = self.attn(dense, dense, dense, attn_mask=causal, key_padding_mask=~mask, need_weights=False)[0]
            return out[mask]
        if self.task == "seq":
            return self.conv(x, data.edge_index, batch=data.batch, seq_len=data.seq_len)
        if self.kind in ("positive", "signed", "signed-child"):
            return self.conv(x, data.edge_index, batch=data.batch)
        return self.conv(x, data.edge_index)


class ParityModel(nn.Module):
    """Bit embedding (+ positions or structural encodings), blocks, final LayerNorm, read-out to 2 classes
    at every node."""

    def __init__(self, kind: str, width: int, layers: int, heads: int, state_dim: int, dropout: float = 0.0,
                 rwse: int = 8, dt_range: Tuple[float, float] = (0.001, 0.1)):
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(2, width)
        self.rwse = nn.Linear(rwse, width) if kind == "tree/gps" else None
        if kind == "tree/gps":
            self.blocks = nn.ModuleList(GPSConv(width, GINConv(nn.Sequential(nn.Linear(width, width), nn.ReLU(),
                                                                             nn.Linear(width, width))),
                                                heads=heads, dropout=dropout) for _ in range(layers))
        else:
            self.blocks = nn.ModuleList(Block(Mixer(kind, width, heads, state_dim, dropout, dt_range), width, dropout)
                                        for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2)

    def forward(self, data) -> Tensor:
        x = self.embed(data.x)
        if self.kind == "seq/transformer":
            x = x + sinusoidal(data.pos[:, 0], x.size(-1))
        if self.rwse is not None:
            x = x + self.rwse(data.rwse)
        for block in self.blocks:
            x = block(x, data.edge_index, data.batch) if self.kind == "tree/gps" else block(x, data)
        return self.head(self.norm(x))


def model_layers(kind: str, args, depth: int) -> int:
    """--layers for Chimera and the Transformer; the deepest training tree's depth for GCN, GIN and GPS."""
    return depth if kind in ("tree/gcn", "tree/gin", "tree/gps") else args.layers


def build(kind: str, width: int, layers: int, args) -> ParityModel:
    return ParityModel(kind, width, layers, args.heads, args.state_dim, args.dropout, args.rwse,
                       (args.dt_min, args.dt_max))


def width_for_budget(kind: str, layers: int, args) -> int:
    attention = kind in ("seq/transformer", "tree/gps")
    return shared_width_for_budget(lambda width: build(kind, width, layers, args), attention, args.heads,
                                   args.budget, kind)


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def predict(model, split: List[Data], device, batch_size: int = 64) -> List[Tuple[Data, Tensor]]:
    model.eval()
    out = []
    for data in DataLoader(split, batch_size=batch_size):
        data = data.to(device)
        out.append((data, model(data).argmax(-1)))
    return out


def last_tokens(data) -> Tensor:
    """Index of the last token of every string of a batch."""
    return data.ptr[1:] - 1


def bucketed_accuracy(keys: List[Tensor], correct: List[Tensor],
                      buckets: Optional[List[Tuple[int, int]]] = None) -> Dict:
    """Accuracy overall and per bucket ``[low, high]`` of ``keys`` (a length or a depth per prediction)."""
    keys, correct = torch.cat(keys), torch.cat(correct).float()
    result = {"acc": correct.mean().item(), "count": correct.numel()}
    if buckets is not None:
        result["buckets"] = []
        for low, high in buckets:
            inside = (keys >= low) & (keys <= high)
            result["buckets"].append({"range": [low, high], "count": int(inside.sum()),
                                      "acc": correct[inside].mean().item() if inside.any() else float("nan")})
    return result


def score_sequences(predictions, buckets: Optional[List[Tuple[int, int]]] = None) -> Dict:
    """Accuracy of the whole string's parity (the last token's prediction), overall and per length bucket."""
    lengths, correct = [], []
    for data, pred in predictions:
        last = last_tokens(data)
        lengths.append(data.seq_len.cpu())
        correct.append((pred[last] == data.y[last]).cpu())
    return bucketed_accuracy(lengths, correct, buckets)


def score_trees(predictions, buckets: Optional[List[Tuple[int, int]]] = None) -> Dict:
    """Node accuracy, overall and per bucket of the node's depth."""
    depths, correct = [], []
    for data, pred in predictions:
        depths.append(data.depth.cpu())
        correct.append((pred == data.y).cpu())
    return bucketed_accuracy(depths, correct, buckets)


def evaluate(task: str, model, split, device, buckets=None) -> Dict:
    scorer = score_sequences if task == "seq" else score_trees
    return scorer(predict(model, split, device), buckets)


def train_one(kind: str, width: int, layers: int, seed: int, splits, args, device, buckets) -> Dict:
    task = kind.split("/")[0]
    torch.manual_seed(seed)
    model = build(kind, width, layers, args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_cosine(optimizer, args.warmup, args.steps)
    history = []
    start, step, running, seen, epoch = time.perf_counter(), 0, 0.0, 0, 0
    bar = tqdm(total=args.steps, desc=f"{kind} seed {seed}", disable=args.quiet, leave=False)
    while step < args.steps:
        epoch += 1
        loader = DataLoader(splits["train"], batch_size=args.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for data in loader:
            model.train()
            data = data.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data), data.y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            running, seen = running + loss.item(), seen + 1
            bar.update(1)
            if step % args.eval_every == 0 or step == args.steps:
                val = evaluate(task, model, splits["val"], device)
                history.append({"step": step, "train_loss": running / seen, "val_acc": val["acc"],
                                "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - start})
                running, seen = 0.0, 0
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val=f"{val['acc']:.3f}")
            if step == args.steps:
                break
    bar.close()
    seconds = time.perf_counter() - start
    test = evaluate(task, model, splits["test"], device, buckets)
    return {"seed": seed, "val_acc": history[-1]["val_acc"], "test": test, "history": history, "seconds": seconds}


# ----------------------------------------------------------------------------- reporting
def bucket_name(low: int, high: int) -> str:
    return f"{low}–{high}" if high > low else f"{low}"


def table(task: str, rows: List[Dict], args) -> str:
    buckets = rows[0]["runs"][0]["test"]["buckets"]
    what = "length" if task == "seq" else "node depth"
    val = (f"val (lengths {args.train_range[0]}–{args.train_range[1]})" if task == "seq"
           else f"val (trees of depth ≤ {args.train_depth})")
    lines = [f"| Model (≤ {args.budget / 1000:g}k params) | params | width | layers | {val} | "
             + " | ".join(f"{what} {bucket_name(*b['range'])}" for b in buckets) + " | s / seed |",
             "|---|---|---|---|---|" + "---|" * len(buckets) + "---|"]
    for row in rows:
        runs = row["runs"]
        cells = [mean_std([r["test"]["buckets"][k]["acc"] for r in runs], 100, 1) for k in range(len(buckets))]
        lines.append(f"| {TITLES[row['model']]} | {row['params']:,} | {row['width']} | {row['layers']} "
                     f"| {mean_std([r['val_acc'] for r in runs], 100, 1)} | " + " | ".join(cells)
                     + f" | {sum(r['seconds'] for r in runs) / len(runs):.0f} |")
    return "\n".join(lines)


def plot(rows: List[Dict], args, path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    tasks = [t for t in TASKS if any(r["model"].startswith(t + "/") for r in rows)]
    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 8), squeeze=False)
    for column, task in enumerate(tasks):
        ax, curves = axes[0, column], axes[1, column]
        for row in (r for r in rows if r["model"].startswith(task + "/")):
            runs = row["runs"]
            buckets = runs[0]["test"]["buckets"]
            xs = [(b["range"][0] + b["range"][1]) / 2 for b in buckets]
            values = torch.tensor([[r["test"]["buckets"][k]["acc"] * 100 for k in range(len(buckets))] for r in runs])
            mean, std = values.mean(0), values.std(0, unbiased=False)
            line, = ax.plot(xs, mean.tolist(), marker="o", label=f"{TITLES[row['model']]}")
            ax.fill_between(xs, (mean - std).tolist(), (mean + std).tolist(), color=line.get_color(), alpha=0.2)
            plot_seeds(curves, runs, "step", lambda h: 100 * h["val_acc"], TITLES[row["model"]], line.get_color())
        low, high = (args.train_range if task == "seq" else (0, args.train_depth))
        ax.axvspan(low, high, color="0.85", label="training range")
        ax.axhline(50, color="0.5", linestyle=":", linewidth=1)
        ax.set_xlabel("string length (test buckets)" if task == "seq" else "node depth (test trees)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(30, 102)
        seeds = [r["seed"] for r in rows[0]["runs"]]
        ax.set_title(f"{TASK_TITLES[task]}: mean ± std over seeds {seeds}")
        ax.legend(fontsize=7)
        curves.set_xlabel("step")
        curves.set_ylabel("validation accuracy (%), training distribution")
        curves.axhline(50, color="0.5", linestyle=":", linewidth=1)
        curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fingerprint(args) -> Dict:
    """The code's fingerprint for this command's tables (see examples/_common.py): every model of the
    tables at its width, seed 0, a few AdamW steps on the first --batch-size training strings or trees."""
    losses, sizes = {}, set()
    for task in TASKS:
        kinds = [k for k in args.models if k.startswith(task + "/")]
        if not kinds:
            continue
        splits = load_splits(task, args)
        batch = Batch.from_data_list(splits["train"][:args.batch_size])
        sizes.add(batch.num_graphs)
        depth = deepest(splits["train"]) if task == "tree" else 0
        for kind in kinds:
            layers = model_layers(kind, args, depth)
            width = width_for_budget(kind, layers, args)
            torch.manual_seed(0)
            model = build(kind, width, layers, args)
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
            losses[kind] = fingerprint_losses(model, optimizer, lambda: F.cross_entropy(model(batch), batch.y),
                                              clip=1.0)
    return fingerprint_record("examples/state_tracking.py",
                              without_options(args.argv, ("--fingerprint-only", "--threads")), max(sizes), losses)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    note_threads_of_this_process(args.threads)
    only, recorded_fingerprint = fingerprint_first(args, "examples/state_tracking.py", fingerprint)
    if only is not None:
        return only
    device = resolve_device(args.device)
    rows, tables, data_summary = [], {}, {}
    stamp_start = time.perf_counter()
    for task in TASKS:
        kinds = [k for k in args.models if k.startswith(task + "/")]
        if not kinds:
            continue
        splits = load_splits(task, args)
        if task == "seq":
            buckets = length_buckets(args.length_edges)
            data_summary[task] = {k: len(v) for k, v in splits.items()}
            print(f"{TASK_TITLES[task]}: {len(splits['train'])} training strings of lengths {args.train_range[0]}–"
                  f"{args.train_range[1]}, {len(splits['test'])} test strings of lengths {args.test_range[0]}–"
                  f"{args.test_range[1]}")
            depth = 0
        else:
            buckets = depth_buckets(args)
            depth = deepest(splits["train"])
            data_summary[task] = {**{k: len(v) for k, v in splits.items()}, "deepest_training_tree": depth,
                                  "test_nodes_per_bucket": [int(sum(((t.depth >= lo) & (t.depth <= hi)).sum()
                                                                    for t in splits["test"])) for lo, hi in buckets]}
            print(f"{TASK_TITLES[task]}: {len(splits['train'])} training trees of depth ≤ {depth}, "
                  f"{len(splits['test'])} test trees of depth {args.depth_edges[0]}–{deepest(splits['test'])}")
        task_rows = []
        for kind in kinds:
            layers = model_layers(kind, args, depth)
            width = width_for_budget(kind, layers, args)
            params = count_parameters(build(kind, width, layers, args))
            print(f"{TITLES[kind]}: {layers} layers, width {width}, {params:,} parameters")
            runs = [train_one(kind, width, layers, seed, splits, args, device, buckets) for seed in args.seed_list]
            print("  test acc. per bucket: " + "; ".join(
                ", ".join(f"{100 * b['acc']:.0f}" for b in r["test"]["buckets"]) for r in runs)
                + f" ({sum(r['seconds'] for r in runs):.0f} s)")
            task_rows.append({"model": kind, "title": TITLES[kind], "task": task, "width": width, "layers": layers,
                              "params": params, "runs": runs})
        tables[task] = table(task, task_rows, args)
        rows += task_rows
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_description(device)
    report = "\n\n".join(f"{TASK_TITLES[task]}:\n\n{text}" for task, text in tables.items())
    print(f"\nState tracking, accuracy (%) of the final weights on longer strings / deeper trees than trained on, "
          f"mean ± std over seeds {args.seed_list} ({device}; {machine}; {stamp}; "
          f"{time.perf_counter() - stamp_start:.0f} s in all):\n")
    print(report)
    summary = {"args": {k: v for k, v in vars(args).items()}, "device": str(device), "machine": machine,
               "date": stamp, "data": data_summary, "tables": tables, "table": report, "results": rows}
    tag = args.tag or device.type
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"state_tracking_{tag}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nsaved {path}")
    png = os.path.join(args.out, f"state_tracking_{tag}.png")
    if plot(rows, args, png):
        print(f"saved {png}")
    if args.record is not None:
        record_result(summary, "examples/state_tracking.py", args.argv,
                      record_paths(args.record, f"state_tracking_{tag}"), png, recorded_fingerprint)
    return summary


if __name__ == "__main__":
    main()
