"""Error of the fused attention's float32 products in ``tf32x3`` (three TF32 passes on the tensor
cores) against ``ieee`` (float32 on the FMA units), on the graphs of bench_squaring_precision.py.

The fused path (``ops/triton_attention.py``) computes ``(L ⊙ QKᵀ)V`` and its backward; the squaring
chain before it and the products ``Lᵀ dL Lᵀ`` after it stay in cuBLAS float32. So the ``tf32x3`` row
is the squaring path in float32 with only the attention's products replaced by an exact CPU
emulation of Triton's ``tf32x3`` dot (the ``F32DotTC`` pass, as the sm_80 / sm_90 PTX shows it):
every float32 operand ``x`` is split into ``hi = cvt.rna.tf32(x)`` (10 mantissa bits, to nearest,
ties away: ``squaring.round_to_precision(x, "tf32")``) and ``lo = x - hi`` (exact), the tensor core
reads ``lo`` truncated to 10 mantissa bits, and ``a·b = (lo_a·hi_b + hi_a·lo_b) + hi_a·hi_b`` with
float32 accumulation (the tf32 products are exact in float32). The ``float32`` row is the same path
with float32 products (what ``ieee`` computes, up to summation order), ``tf32`` one TF32 pass.

The rule of issue 17: ``tf32x3`` becomes the CUDA default of float32 inputs if its error is within
2x of float32's on cyclic graphs and DAGs, for every quantity (the output and every gradient).

On CUDA (``--device cuda``) it also times the fused kernels themselves (forward and backward of
``(L ⊙ QKᵀ)V`` at ``G·H = 256``, ``m = 128``, ``S = 16``, ``P = 64``) with ``tf32x3`` and with
``ieee`` products, and measures their error against float64 (the ``kernels`` entry of the JSON).

    python benchmarks/bench_triton_precision.py --out benchmarks/results/triton_precision_cpu.json
"""
import argparse

import torch
from bench_squaring_precision import QUANTITIES, add_problem_arguments, random_batch, values_and_grads
from common import device_name, time_it, write_json

from torch_geometric_chimera.ops import squaring
from torch_geometric_chimera.ops.dense import dense_resolvent_attention
from torch_geometric_chimera.ops.squaring import round_to_precision, squaring_resolvent_attention
from torch_geometric_chimera.utils import topological_levels

#: Largest ratio of tf32x3's error to float32's that makes it the default (issue 17).
RULE_RATIO = 2.0


def _chop_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the low 13 mantissa bits cleared: what a TF32 tensor core reads of a float32 register."""
    return (x.view(torch.int32) & -8192).view(torch.float32)


def tf32x3_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as Triton's ``input_precision="tf32x3"`` computes it (module docstring), float32."""
    hi_a, hi_b = round_to_precision(a, "tf32"), round_to_precision(b, "tf32")
    lo_a, lo_b = _chop_tf32(a - hi_a), _chop_tf32(b - hi_b)
    return (lo_a @ hi_b + hi_a @ lo_b) + hi_a @ hi_b


def attention_tf32x3(resolvent, q, k, v, precision="float32"):
    """``squaring.masked_attention`` with every product in tf32x3 (float32 inputs only)."""
    assert precision == "float32" and q.dtype == torch.float32
    return tf32x3_matmul(resolvent * tf32x3_matmul(q, k.transpose(-1, -2)), v)


def attention_backward_tf32x3(resolvent, q, k, v, grad_y, precision="float32"):
    """``squaring.masked_attention_backward`` with every product in tf32x3: the fused backward kernels'
    products (``dL = dM ⊙ QKᵀ``, ``dQ``, ``dK``, ``dV``)."""
    assert precision == "float32" and q.dtype == torch.float32
    scores = tf32x3_matmul(q, k.transpose(-1, -2))
    grad_mask = tf32x3_matmul(grad_y, v.transpose(-1, -2))
    grad_scores = grad_mask * resolvent
    return (grad_mask * scores, tf32x3_matmul(grad_scores, k), tf32x3_matmul(grad_scores.transpose(-1, -2), q),
            tf32x3_matmul((resolvent * scores).transpose(-1, -2), grad_y))


class tf32x3_attention:
    """Within it, the squaring path's ``(L ⊙ QKᵀ)V`` and its backward run in emulated tf32x3."""

    def __enter__(self):
        self.saved = squaring.masked_attention, squaring.masked_attention_backward
        squaring.masked_attention, squaring.masked_attention_backward = attention_tf32x3, attention_backward_tf32x3

    def __exit__(self, *exc):
        squaring.masked_attention, squaring.masked_attention_backward = self.saved


def measure(kind: str, seeds, num_graphs: int, min_nodes: int, max_nodes: int, heads: int, state: int):
    rows = {}
    for seed in seeds:
        q, k, v, edge_index, weight, batch, grad, _ = random_batch(kind, num_graphs, min_nodes, max_nodes, heads,
                                                                   state, seed)
        depth = int(topological_levels(edge_index, batch.numel()).max()) if kind == "dag" else None
        exact = values_and_grads(lambda q_, k_, v_, w_: dense_resolvent_attention(q_, k_, v_, edge_index, w_, batch),
                                 q, k, v, weight, grad, torch.float64)

        def squaring_path(precision):
            return lambda q_, k_, v_, w_: squaring_resolvent_attention(
                q_, k_, v_, edge_index, w_, batch, precision=precision, depth=depth,
                gamma=0.9 if depth is None else None)

        for name, precision in (("float32", "float32"), ("tf32x3", "float32"), ("tf32", "tf32")):
            if name == "tf32x3":
                with tf32x3_attention():
                    got = values_and_grads(squaring_path(precision), q, k, v, weight, grad, torch.float32)
            else:
                got = values_and_grads(squaring_path(precision), q, k, v, weight, grad, torch.float32)
            row = rows.setdefault(name, {key: 0.0 for key in QUANTITIES})
            for key in QUANTITIES:
                row[key] = max(row[key], float((got[key] - exact[key]).abs().max() / exact[key].abs().max()))
    rows["tf32x3 / float32"] = {key: rows["tf32x3"][key] / rows["float32"][key] for key in QUANTITIES}
    return rows


def time_kernels(device: str, reps: int, batch: int = 256, m: int = 128, state: int = 16, head_dim: int = 64):
    """Median seconds of the fused forward + backward, and the largest error (relative to the largest
    float64 value) of the output and the gradients, with ``tf32x3`` and with ``ieee`` products."""
    from torch_geometric_chimera.ops import triton_attention as ta
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(batch, m, m, generator=gen, dtype=torch.float64) / m ** 0.5,
               *(torch.randn(batch, m, state, generator=gen, dtype=torch.float64) for _ in range(2)),
               torch.randn(batch, m, head_dim, generator=gen, dtype=torch.float64)]
    grad_y = torch.randn(batch, m, head_dim, generator=gen, dtype=torch.float64).to(device)
    exact = (ta.attention_forward(*[t.to(device) for t in tensors]),
             *ta.attention_backward(*[t.to(device) for t in tensors], grad_y))
    inputs = [t.to(device, torch.float32) for t in tensors]
    results, saved = {}, ta.FLOAT32_INPUT_PRECISION
    try:
        for name in ("tf32x3", "ieee"):
            ta.FLOAT32_INPUT_PRECISION = name

            def step():
                return ta.attention_forward(*inputs), *ta.attention_backward(*inputs, grad_y.float())

            got = step()
            errors = [float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(got, exact)]
            results[name] = {"median_s": time_it(step, device, reps=reps)["median_s"],
                             "max_relative_error": dict(zip(("y", "L", "q", "k", "v"), errors))}
    finally:
        ta.FLOAT32_INPUT_PRECISION = saved
    results["time_ratio"] = results["tf32x3"]["median_s"] / results["ieee"]["median_s"]
    return {"sizes": dict(batch=batch, m=m, state=state, head_dim=head_dim), **results}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_problem_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cuda: also time and check the fused kernels")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    for kind in ("general", "dag"):
        rows = measure(kind, range(args.seeds), args.graphs, args.min_nodes, args.max_nodes, args.heads, args.state)
        results[kind] = rows
        print(f"{kind}:")
        print(f"  {'':18s}" + "".join(f"{key:>13s}" for key in QUANTITIES))
        for name, row in rows.items():
            print(f"  {name:18s}" + "".join(f"{row[key]:13.2e}" for key in QUANTITIES))
    worst = max(ratio for rows in results.values() for ratio in rows["tf32x3 / float32"].values())
    verdict = "tf32x3" if worst <= RULE_RATIO else "ieee"
    print(f"worst tf32x3 / float32 error ratio: {worst:.2f} (rule: <= {RULE_RATIO}): default {verdict}")
    kernels = time_kernels(args.device, args.reps) if torch.device(args.device).type == "cuda" else None
    if kernels:
        print(f"fused kernels: tf32x3 {kernels['tf32x3']['median_s'] * 1e3:.3f} ms, ieee "
              f"{kernels['ieee']['median_s'] * 1e3:.3f} ms ({kernels['time_ratio']:.2f}x)")
    if args.out:
        write_json(args.out, {"device": device_name(args.device), "args": vars(args), "max_relative_error": results,
                              "worst_ratio": worst, "default": verdict, "kernels": kernels})


if __name__ == "__main__":
    main()
