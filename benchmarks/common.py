"""Shared helpers for the benchmarks: peptide-sized graph batches, timing and JSON output."""
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict

import torch
from torch_geometric.utils import to_undirected


def peptide_like_batch(num_graphs: int = 64, mean_nodes: int = 150, seed: int = 0, device="cpu",
                       same_size: bool = False, sizes=None):
    """Molecule-like graphs: a random tree plus a few ring-closing bonds, both directions stored,
    so about ``2 * n`` directed edges per graph of ``n`` nodes (peptides-func: 150 nodes, 307 edges).
    Sizes are drawn from ``[2/3, 4/3] * mean_nodes``, all ``mean_nodes`` with ``same_size``, or given
    as ``sizes`` (then ``num_graphs`` is ``len(sizes)``)."""
    generator = torch.Generator().manual_seed(seed)
    edges, batch, offset = [], [], 0
    if sizes is not None:
        num_graphs = len(sizes)
    for g in range(num_graphs):
        if sizes is None:
            n = int(torch.randint(mean_nodes * 2 // 3, mean_nodes * 4 // 3 + 1, (1,), generator=generator))
            n = mean_nodes if same_size else n
        else:
            n = int(sizes[g])
        parent = (torch.rand(n - 1, generator=generator) * torch.arange(1, n)).long()
        tree = torch.stack([parent, torch.arange(1, n)])
        rings = torch.randint(0, n, (2, max(1, n // 50)), generator=generator)
        graph = to_undirected(torch.cat([tree, rings[:, rings[0] != rings[1]]], 1), num_nodes=n)
        edges.append(graph + offset)
        batch.append(torch.full((n,), g, dtype=torch.long))
        offset += n
    return torch.cat(edges, 1).to(device), torch.cat(batch).to(device), offset


def real_peptide_batch(num_graphs: int = 64, seed: int = 0, device="cpu"):
    """Real peptide molecules of LRGB's size: RDKit builds random sequences of 14 to 26 residues
    (about 150 heavy atoms, as peptides-func's 151 on average); bonds in both directions."""
    import random

    from rdkit import Chem
    rng = random.Random(seed)
    edges, batch, offset = [], [], 0
    for g in range(num_graphs):
        mol = Chem.MolFromSequence("".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(14, 26))))
        bonds = torch.tensor([[b.GetBeginAtomIdx(), b.GetEndAtomIdx()] for b in mol.GetBonds()]).t()
        n = mol.GetNumAtoms()
        edges.append(to_undirected(bonds, num_nodes=n) + offset)
        batch.append(torch.full((n,), g, dtype=torch.long))
        offset += n
    return torch.cat(edges, 1).to(device), torch.cat(batch).to(device), offset


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_it(fn: Callable[[], None], device, warmup: int = 3, reps: int = 10) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "reps": reps}


def time_interleaved(fns: Dict[str, Callable[[], None]], device, warmup: int = 2, reps: int = 10
                     ) -> Dict[str, Dict[str, float]]:
    """Time several functions round-robin (A, B, A, B, ...) so that drift of a shared machine
    hits all of them alike; returns the median and minimum of each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "reps": reps} for name, s in samples.items()}


def compare(results: Dict, baseline: str, baseline_fn: Callable[[], None], name: str, fn: Callable[[], None],
            device="cpu", reps: int = 10) -> None:
    """Time ``fn`` against ``baseline_fn`` interleaved; store both and ``results["ratio"]``, and print."""
    results.update(time_interleaved({baseline: baseline_fn, name: fn}, device, reps=reps))
    results["ratio"] = results[name]["median_s"] / results[baseline]["median_s"]
    print(f"{baseline}: {results[baseline]['median_s'] * 1e3:.1f} ms, {name}: {results[name]['median_s'] * 1e3:.1f} ms, "
          f"ratio {results['ratio']:.2f}x")


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def write_json(path: str, payload: Dict) -> None:
    payload = dict(payload)
    payload.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    payload.setdefault("command", " ".join([os.path.basename(sys.executable)] + sys.argv))
    payload.setdefault("torch", torch.__version__)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
