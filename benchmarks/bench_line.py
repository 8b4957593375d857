"""method='line' against a pure-PyTorch chunked SSD (Mamba-2 style, chunk 64) and the generic DAG path.

A batch of ``--sequences`` sequences of T tokens each with Mamba-2 transitions exp(-Δ_t), H heads,
state S, head size P; forward + backward, all three in this process on the same inputs. Chimera gets
the batch as one graph of independent paths; the chunked SSD gets the sequences as more heads
(sequences of equal length are independent, exactly as heads are).

    python benchmarks/bench_line.py --out benchmarks/results/line_cpu.json
    python benchmarks/bench_line.py --device cuda --sequences 8 --length 8192 --heads 8 --out line.json
"""
import argparse

import torch
import torch.nn.functional as F
from common import device_name, time_interleaved, time_it, write_json

from torch_geometric_chimera.ops import resolvent_attention
from torch_geometric_chimera.utils import line_graph_dags


def log_segsum(x):
    """sum_{s<k<=t} x_k below the diagonal, -inf above (log-space decays)."""
    T = x.size(-1)
    cs = torch.cumsum(x, -1)
    out = cs.unsqueeze(-1) - cs.unsqueeze(-2)
    return out.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device)), float("-inf"))


def chunked_ssd(x, log_a, B, C, chunk=64):
    """Baseline: Mamba-2's SSD in chunks. x [T,H,P], log_a [T,H] (= -Δ), B, C [T,H,S] (B already Δ-scaled)."""
    T, H, P = x.shape
    c = T // chunk
    x, B, C = (t.view(c, chunk, H, -1) for t in (x, B, C))
    a = log_a.view(c, chunk, H).permute(0, 2, 1)  # [c, H, Q]
    a_cum = torch.cumsum(a, -1)
    y = torch.einsum("clhs,cmhs,chlm,cmhp->clhp", C, B, torch.exp(log_segsum(a)), x)
    states = torch.einsum("cmhs,chm,cmhp->chsp", B, torch.exp(a_cum[..., -1:] - a_cum), x)
    chunk_decay = torch.exp(log_segsum(F.pad(a_cum[..., -1].t(), (1, 0))))  # [H, c+1, c+1]
    states = torch.cat([torch.zeros_like(states[:1]), states])
    states = torch.einsum("hij,jhsp->ihsp", chunk_decay, states)[:-1]
    y = y + torch.einsum("clhs,chsp,chl->clhp", C, states, torch.exp(a_cum))
    return y.reshape(T, H, P)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--length", type=int, default=2048, help="tokens per sequence, a multiple of 64")
    parser.add_argument("--sequences", type=int, default=1, help="sequences in the batch")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--state", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/line.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    T, H, S, P, N = args.length, args.heads, args.state, args.head_dim, args.sequences
    if T % 64 or T < 64:
        parser.error(f"--length: the chunked SSD takes whole chunks of 64 tokens, got {T}")
    if N < 1:
        parser.error(f"--sequences: expected a positive number, got {N}")
    # Tokens of sequence n are rows n * T ... (n + 1) * T - 1.
    x = torch.randn(N * T, H, P, device=device, requires_grad=True)
    B = torch.randn(N * T, H, S, device=device, requires_grad=True)
    C = torch.randn(N * T, H, S, device=device, requires_grad=True)
    delta = F.softplus(torch.randn(N * T, H, device=device)).requires_grad_()
    batch = torch.arange(N, device=device).repeat_interleave(T) if N > 1 else None
    forward, _ = line_graph_dags(N * T, batch=batch, device=device)

    def chimera(method):
        weight = torch.exp(-delta[forward[1]])  # A[t, t-1] = exp(-Δ_t)
        return resolvent_attention(C, delta.unsqueeze(-1) * B, x, forward, weight, method=method, batch=batch)

    def as_heads(t):  # [N * T, H, F] -> [T, N * H, F]: the sequences side by side as heads
        return t.view(N, T, H, -1).transpose(0, 1).reshape(T, N * H, -1)

    def baseline():
        y = chunked_ssd(as_heads(x), as_heads(-delta.unsqueeze(-1)).squeeze(-1), as_heads(delta.unsqueeze(-1) * B),
                        as_heads(C))
        return y.view(T, N, H, P).transpose(0, 1).reshape(N * T, H, P)

    torch.testing.assert_close(chimera("line"), baseline(), rtol=1e-3, atol=1e-3)

    def step(fn):
        def run():
            for t in (x, B, C, delta):
                t.grad = None
            fn().square().mean().backward()
        return run

    results = {"device": device_name(device), "T": T, "sequences": N, "heads": H, "state": S, "head_dim": P,
               "baseline": "pure-PyTorch chunked SSD, chunk 64"}
    results.update(time_interleaved({"chunked_ssd": step(baseline), "line": step(lambda: chimera("line"))},
                                    device, reps=args.reps))
    results["dag"] = time_it(step(lambda: chimera("dag")), device, warmup=1, reps=2)
    results["line_vs_ssd"] = results["line"]["median_s"] / results["chunked_ssd"]["median_s"]
    results["dag_vs_line_speedup"] = results["dag"]["median_s"] / results["line"]["median_s"]
    for key in ("chunked_ssd", "line", "dag"):
        print(f"{key}: {results[key]['median_s'] * 1e3:.1f} ms")
    print(f"line / chunked SSD = {results['line_vs_ssd']:.2f}x; line is {results['dag_vs_line_speedup']:.1f}x "
          f"faster than the generic DAG path")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
