"""Fit the constants of ``method="auto"``'s cost model (``torch_geometric_chimera/ops/resolvent.py``)
to timings of ``bench_auto_panel.py``: non-negative least squares on relative error, per path, on
the geometric mean of every row's runs; prints the constants and the choice they make per row.

    python benchmarks/fit_auto_panel.py benchmarks/results/auto_panel_cpu_runs.json
"""
import argparse
import json

import numpy as np
import torch
from bench_auto_panel import panel
from scipy.optimize import nnls

from torch_geometric_chimera.ops.resolvent import DAG_MARGIN, GraphTopology

MODEL = {  # per path: (constant name, feature of (graph features, H, S, P))
    "dense": [("DENSE_CUBIC_S", lambda f, H, S, P: H * f["cubic"]),
              ("DENSE_SQUARE_S", lambda f, H, S, P: H * f["square"] * (S + P)),
              ("DENSE_GRAPH_S", lambda f, H, S, P: H * f["graphs"])],
    "band": [("BAND_NODE_S", lambda f, H, S, P: H * S * P * f["nodes"]),
             ("BAND_NONZERO_S", lambda f, H, S, P: H * S * P * f["nonzeros"]),
             ("BAND_FACTOR_S", lambda f, H, S, P: H * f["factor"])],
    "dag": [("DAG_ELEMENT_S", lambda f, H, S, P: H * S * P * (f["nodes"] + f["edges"]))],
}


def features():
    out = {}
    for label, (edge_index, batch, n), _ in panel(torch.Generator().manual_seed(0)):
        topology = GraphTopology(edge_index, n, batch)
        sizes, schedule = topology.graph_sizes.double(), topology.band_schedule
        padded = topology.padded_sizes().double()  # as dense pads them (path_costs)
        out[label] = {"cubic": float((3 * padded ** 3).sum()), "square": float((6 * padded ** 2).sum()),
                      "graphs": float(sizes.numel()), "nodes": n, "edges": edge_index.size(1),
                      "nonzeros": float(schedule.factor_nnz.sum()),
                      "factor": float((sizes * schedule.bandwidth.double() ** 2).sum())}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON files of bench_auto_panel.py (or auto_panel_cpu_runs.json)")
    args = parser.parse_args()
    samples = {}
    for path in args.runs:
        for row in json.load(open(path))["rows"]:
            key = (row["graphs"], row["H"], row["S"], row["P"])
            for method, t in row["seconds"].items():
                samples.setdefault(key, {}).setdefault(method, []).extend(t if isinstance(t, list) else [t])
    seconds = {key: {m: float(np.exp(np.mean(np.log(v)))) for m, v in d.items()} for key, d in samples.items()}
    feats = features()
    constants = {}
    for method, columns in MODEL.items():
        rows = [(feats[key[0]], key[1:], s[method]) for key, s in seconds.items() if method in s]
        a = np.array([[fn(f, *shape) / t for _, fn in columns] for f, shape, t in rows])
        coef = nnls(a, np.ones(len(rows)))[0]
        constants.update({name: c for (name, _), c in zip(columns, coef)})
    for name, value in constants.items():
        print(f"{name} = {value:.3g}")
    worst = 1.0
    for key, s in seconds.items():
        f = feats[key[0]]
        estimate = {m: sum(constants[name] * fn(f, *key[1:]) for name, fn in MODEL[m]) for m in s}
        dag = estimate.pop("dag", None)
        best = min(estimate, key=estimate.get)
        pick = "dag" if dag is not None and dag < DAG_MARGIN * estimate[best] else best
        ratio = s[pick] / min(s.values())
        worst = max(worst, ratio)
        print(f"{key[0]:36s} H={key[1]} S={key[2]:3d} P={key[3]:3d}  "
              + "  ".join(f"{m} {t * 1e3:7.1f} ms" for m, t in s.items()) + f"  model picks {pick}, ratio {ratio:.2f}")
    print(f"worst: {worst:.2f}")


if __name__ == "__main__":
    main()
