"""Error of the squaring path (float32, tf32, bf16 products) against the float64 inverse.

Batches of random graphs, float32 inputs: ``general`` graphs (cycles, self-loops, duplicate edges;
the ``general`` adjacency with gamma = 0.9, so every row of |A| sums to at most 0.9) with ``k`` from
the bound, and random DAGs (the ``dag`` adjacency of Prop. 4.3) with ``k`` exact for their depth.
For every quantity (the output and the gradients of edge_weight, query, key, value for a random
output gradient) the error is max |x - x_ref| / max |x_ref|, the maximum over the seeds; the
reference is the ``dense`` path (float64 batched inverse, exact backward). The row ``dense float32``
is the same exact path in float32, for comparison. tf32 and bf16 are emulated off CUDA
(``squaring.round_to_precision``); on CUDA the tensor cores compute them.

    python benchmarks/bench_squaring_precision.py --out benchmarks/results/squaring_precision_cpu.json
"""
import argparse

import torch
from common import device_name, write_json

from torch_geometric_chimera.nn.adjacency import dag_adjacency, general_adjacency
from torch_geometric_chimera.ops.dense import dense_resolvent_attention
from torch_geometric_chimera.ops.squaring import squaring_resolvent_attention
from torch_geometric_chimera.utils import topological_levels

QUANTITIES = ("y", "edge_weight", "query", "key", "value")


def random_batch(kind: str, num_graphs: int, min_nodes: int, max_nodes: int, heads: int, state: int, seed: int,
                 device="cpu"):
    """Graphs of ``kind`` ("general" or "dag") with their weights, features and node-to-graph map."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(min_nodes, max_nodes + 1, (num_graphs,), generator=gen)
    batch = torch.repeat_interleave(torch.arange(num_graphs), sizes)
    num_nodes = int(sizes.sum())
    first = torch.cumsum(sizes, 0) - sizes
    graph = batch[torch.randint(0, num_nodes, (3 * num_nodes,), generator=gen)]  # about 3 edges per node
    n = sizes[graph]
    a = (torch.rand(graph.numel(), generator=gen) * n).long()
    b = (torch.rand(graph.numel(), generator=gen) * n).long()
    if kind == "dag":  # forward in node order: acyclic
        keep = a < b
        a, b, graph = a[keep], b[keep], graph[keep]
    edge_index = torch.stack([first[graph] + a, first[graph] + b])
    delta = torch.rand(num_nodes, heads, generator=gen, dtype=torch.float64)
    if kind == "general":
        weight, _ = general_adjacency(delta, edge_index, torch.full_like(delta, 5.0), gamma=0.9)
    else:
        weight, _ = dag_adjacency(delta, edge_index)
    q, k = (torch.randn(num_nodes, heads, state, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(num_nodes, heads, state, generator=gen, dtype=torch.float64)
    grad = torch.randn(num_nodes, heads, state, generator=gen, dtype=torch.float64)
    to = dict(device=device)
    return (q.to(**to), k.to(**to), v.to(**to), edge_index.to(**to), weight.to(**to), batch.to(**to), grad.to(**to),
            int(sizes.max()))


def values_and_grads(fn, q, k, v, weight, grad, dtype):
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v, weight)]
    y = fn(*inputs)
    grads = torch.autograd.grad(y, inputs, grad.to(dtype))
    return dict(zip(QUANTITIES, [y.detach().double(), grads[3].double(), grads[0].double(), grads[1].double(),
                                 grads[2].double()]))


def measure(kind: str, seeds, num_graphs: int, min_nodes: int, max_nodes: int, heads: int, state: int, device):
    rows = {}
    for seed in seeds:
        q, k, v, edge_index, weight, batch, grad, largest = random_batch(kind, num_graphs, min_nodes, max_nodes,
                                                                         heads, state, seed, device)
        depth = int(topological_levels(edge_index, batch.numel()).max()) if kind == "dag" else None
        exact = values_and_grads(lambda q_, k_, v_, w_: dense_resolvent_attention(q_, k_, v_, edge_index, w_, batch),
                                 q, k, v, weight, grad, torch.float64)
        runs = {"dense float32": lambda q_, k_, v_, w_: dense_resolvent_attention(q_, k_, v_, edge_index, w_, batch)}
        for precision in ("float32", "tf32", "bf16"):
            runs[precision] = (lambda p: lambda q_, k_, v_, w_: squaring_resolvent_attention(
                q_, k_, v_, edge_index, w_, batch, precision=p, depth=depth,
                gamma=0.9 if depth is None else None))(precision)
        for name, fn in runs.items():
            got = values_and_grads(fn, q, k, v, weight, grad, torch.float32)
            errors = {key: float((got[key] - exact[key]).abs().max() / exact[key].abs().max()) for key in QUANTITIES}
            row = rows.setdefault(name, {key: 0.0 for key in QUANTITIES})
            for key in QUANTITIES:
                row[key] = max(row[key], errors[key])
        if depth is not None:
            rows["max depth"] = max(rows.get("max depth", 0), depth)
        else:
            rows["gamma"] = 0.9
    return rows


def add_problem_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch of random graphs (:func:`random_batch`) this benchmark and bench_triton_precision.py measure on."""
    parser.add_argument("--graphs", type=int, default=64)
    parser.add_argument("--min-nodes", type=int, default=8)
    parser.add_argument("--max-nodes", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--state", type=int, default=16, help="S = P")
    parser.add_argument("--seeds", type=int, default=5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_problem_arguments(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    for kind in ("general", "dag"):
        rows = measure(kind, range(args.seeds), args.graphs, args.min_nodes, args.max_nodes, args.heads, args.state,
                       args.device)
        results[kind] = rows
        print(f"{kind}: " + ", ".join(f"{k}={v}" for k, v in rows.items() if not isinstance(v, dict)))
        print(f"  {'':14s}" + "".join(f"{key:>13s}" for key in QUANTITIES))
        for name, row in rows.items():
            if isinstance(row, dict):
                print(f"  {name:14s}" + "".join(f"{row[key]:13.2e}" for key in QUANTITIES))
    if args.out:
        write_json(args.out, {"device": device_name(args.device), "args": vars(args), "max_relative_error": results})


if __name__ == "__main__":
    main()
