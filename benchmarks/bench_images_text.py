"""Images and text as graphs: ChimeraConv with a DAG decomposition against attention of equal width.

- images: a batch of images of ``side x side`` patches (ImageToGrid's grid), ``ChimeraConv(width,
  decomposition='grid')`` against a ViT-style multi-head self-attention layer (``nn.MultiheadAttention``:
  QKV and output projections, softmax attention over all patches of an image);
- text: one sequence of T tokens, ``ChimeraConv(width, decomposition='line')`` (both directed lines)
  and ``decomposition='fwd'`` against an attention layer of equal width built on
  ``torch.nn.functional.scaled_dot_product_attention`` (QKV projection, SDPA, output projection).

Forward + backward, every model timed round-robin with its baseline in this process.

    python benchmarks/bench_images_text.py --out benchmarks/results/images_text_cpu.json
"""
import argparse

import torch
import torch.nn.functional as F
from common import device_name, time_interleaved, write_json

from torch_geometric_chimera import ChimeraConv


class SdpaAttention(torch.nn.Module):
    """Self-attention of width ``channels``: QKV projection, SDPA over ``heads`` heads, output projection."""

    def __init__(self, channels, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(channels, 3 * channels)
        self.out = torch.nn.Linear(channels, channels)

    def forward(self, x, is_causal=False):  # x [B, T, C]
        batch, length, channels = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return self.out(y.transpose(1, 2).reshape(batch, length, channels))


def allocated_megabytes(fn):
    """Megabytes allocated on the host by one call of ``fn`` (torch.profiler's memory events):
    on CPU, tensors of 32 MB and more come from fresh mmaps whose page faults cost real time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(0, e.self_cpu_memory_usage) for e in prof.key_averages()) / 2**20


def run_case(name, fns, device, reps):
    timings = time_interleaved(fns, device, reps=reps)
    baseline = next(iter(fns))
    for key, entry in timings.items():
        entry["ratio"] = entry["median_s"] / timings[baseline]["median_s"]
        if device.type == "cpu":
            entry["allocated_mb"] = allocated_megabytes(fns[key])
        print(f"{name}: {key} {entry['median_s'] * 1e3:.1f} ms ({entry['ratio']:.2f}x {baseline})"
              + (f", {entry['allocated_mb']:.0f} MB allocated" if "allocated_mb" in entry else ""))
    return timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=64, help="images in the batch")
    parser.add_argument("--side", type=int, default=32, help="patches per image side")
    parser.add_argument("--length", type=int, default=4096, help="tokens of the text sequence")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--state-dim", type=int, default=16)
    parser.add_argument("--expand", type=int, default=2)
    parser.add_argument("--method", default="auto", help="ChimeraConv's solver of every DAG")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip", choices=["images", "text"], default=None)
    parser.add_argument("--out", default="benchmarks/results/images_text.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    width, heads = args.width, args.heads
    layer = dict(heads=heads, state_dim=args.state_dim, expand=args.expand, method=args.method)
    payload = {"device": device_name(device), "width": width, "heads": heads, "state_dim": args.state_dim,
               "expand": args.expand, "method": args.method}
    no_edges = torch.empty(2, 0, dtype=torch.long, device=device)

    if args.skip != "images":
        num_images, side = args.images, args.side
        nodes = side * side
        grid_size = torch.tensor([[side, side]] * num_images, device=device)
        batch = torch.arange(num_images, device=device).repeat_interleave(nodes)
        x = torch.randn(num_images * nodes, width, device=device, requires_grad=True)
        chimera = ChimeraConv(width, decomposition="grid", **layer).to(device)
        mha = torch.nn.MultiheadAttention(width, heads, batch_first=True).to(device)
        tokens = x.detach().view(num_images, nodes, width).clone().requires_grad_()
        fns = {
            "vit_attention": lambda: mha(tokens, tokens, tokens, need_weights=False)[0].sum().backward(),
            "chimera_grid": lambda: chimera(x, no_edges, batch=batch, grid_size=grid_size).sum().backward(),
        }
        payload["images"] = {"num_images": num_images, "side": side,
                             "timings": run_case("images", fns, device, args.reps)}

    if args.skip != "text":
        length = args.length
        x = torch.randn(length, width, device=device, requires_grad=True)
        seq_len = torch.tensor([length], device=device)
        sdpa = SdpaAttention(width, heads).to(device)
        line = ChimeraConv(width, decomposition="line", **layer).to(device)
        fwd = ChimeraConv(width, decomposition="fwd", **layer).to(device)
        tokens = x.detach().unsqueeze(0).clone().requires_grad_()
        fns = {
            "sdpa_attention": lambda: sdpa(tokens).sum().backward(),
            "sdpa_causal": lambda: sdpa(tokens, is_causal=True).sum().backward(),
            "chimera_line": lambda: line(x, no_edges, seq_len=seq_len).sum().backward(),
            "chimera_fwd": lambda: fwd(x, no_edges, seq_len=seq_len).sum().backward(),
        }
        payload["text"] = {"length": length, "timings": run_case("text", fns, device, args.reps)}
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
