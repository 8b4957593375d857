"""examples/state_tracking.py: the smoke configuration end to end, the JSON log, and the data: labels
checked by brute force, trees are trees, test strings and trees longer and deeper than the training ones."""
import importlib.util
import json
import math
import os
import random

import pytest
import torch
from torch_geometric.data import Batch

REPO = os.path.join(os.path.dirname(__file__), "..", "..")


def load_example():
    spec = importlib.util.spec_from_file_location("state_tracking_example",
                                                  os.path.join(REPO, "examples", "state_tracking.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


def test_smoke_run_trains_every_model_and_logs(example, tmp_path):
    summary = example.main(["--smoke", "--seeds", "0,1", "--quiet", "--out", str(tmp_path), "--tag", "t"])
    logged = json.loads((tmp_path / "state_tracking_t.json").read_text())
    assert logged["table"] == summary["table"] and set(logged["tables"]) == {"seq", "tree"}
    assert [r["model"] for r in logged["results"]] == list(example.MODELS)
    args = logged["args"]
    budget, steps = args["budget"], args["steps"]
    depth = logged["data"]["tree"]["deepest_training_tree"]
    assert depth == args["train_depth"]  # the training set reaches its depth cap
    for row in logged["results"]:
        assert 0.7 * budget <= row["params"] <= budget, row  # equal budget
        # GCN, GIN and GPS have as many layers as the deepest training tree, the others --layers
        assert row["layers"] == (depth if row["model"] in ("tree/gcn", "tree/gin", "tree/gps") else args["layers"])
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        for run in row["runs"]:
            assert [h["step"] for h in run["history"]] == [2, steps]
            assert all(math.isfinite(h["train_loss"]) and 0 <= h["val_acc"] <= 1 for h in run["history"])
            buckets = run["test"]["buckets"]
            assert all(0 <= b["acc"] <= 1 and b["count"] > 0 for b in buckets)
            if row["task"] == "seq":
                # every test string is longer than every training string
                assert buckets[0]["range"][0] > args["train_range"][1]
                assert sum(b["count"] for b in buckets) == run["test"]["count"]
            else:
                # the first bucket holds the training depths, the others lie beyond them
                assert buckets[0]["range"] == [0, args["train_depth"]]
                assert all(b["range"][0] > args["train_depth"] for b in buckets[1:])
    assert "| Chimera fwd, signed (2exp(-Δ)-1) |" in logged["table"] and "| GPS (GIN + attention, RWSE) |" \
        in logged["table"] and " ± " in logged["table"]
    assert (tmp_path / "state_tracking_t.png").stat().st_size > 0


def test_parity_strings_are_labelled_by_brute_force(example):
    generator = torch.Generator().manual_seed(0)
    strings = example.parity_strings(50, (3, 40), generator)
    for data in strings:
        bits = data.x.tolist()
        assert 3 <= len(bits) <= 40 and data.seq_len.tolist() == [len(bits)]
        assert data.y.tolist() == [sum(bits[:t + 1]) % 2 for t in range(len(bits))]
        # the directed line t -> t + 1
        assert data.edge_index.tolist() == [list(range(len(bits) - 1)), list(range(1, len(bits)))]
    args = example.parse_args(["--smoke"])
    splits = example.sequence_splits(args)
    train_max = max(int(d.seq_len) for d in splits["train"] + splits["val"])
    assert train_max <= args.train_range[1] < min(int(d.seq_len) for d in splits["test"])
    # the last token's label is the parity of the whole string
    batch = Batch.from_data_list(splits["test"])
    last = example.last_tokens(batch)
    assert batch.y[last].tolist() == [int(d.x.sum()) % 2 for d in splits["test"]]


def test_trees_are_rooted_trees_labelled_by_brute_force(example):
    rng = random.Random(0)
    for depths in ((1, 8), (9, 16), (40, 59)):
        for _ in range(30):
            tree = example.random_tree((20, 60), depths, rng)
            n = tree.num_nodes
            assert 20 <= n <= 60 and tree.edge_index.size(1) == n - 1
            parent = {}
            for p, c in tree.edge_index.t().tolist():
                assert c not in parent  # one parent per node
                parent[c] = p
            roots = [v for v in range(n) if v not in parent]
            assert len(roots) == 1
            for v in range(n):  # every node reaches the root: connected, no cycle
                path, u = [v], v
                while u in parent:
                    u = parent[u]
                    path.append(u)
                    assert len(path) <= n
                assert u == roots[0]
                assert tree.depth[v] == len(path) - 1
                assert tree.y[v] == sum(tree.x[path].tolist()) % 2  # parity of the bits on the root path
            assert depths[0] <= int(tree.depth.max()) <= depths[1]
    args = example.parse_args(["--smoke"])
    splits = example.tree_splits(args)
    assert example.deepest(splits["train"] + splits["val"]) <= args.train_depth < min(
        int(t.depth.max()) for t in splits["test"])


def test_random_walk_encodings_match_pyg(example):
    from torch_geometric.data import Data
    from torch_geometric.transforms import AddRandomWalkPE
    trees = [example.random_tree((5, 30), (1, 12), random.Random(seed)) for seed in range(6)]
    example.add_random_walk_encodings(trees, 6, chunk=4)
    for tree in trees:
        undirected = Data(edge_index=torch.cat([tree.edge_index, tree.edge_index.flip(0)], 1), num_nodes=tree.num_nodes)
        assert torch.allclose(AddRandomWalkPE(6)(undirected).random_walk_pe, tree.rwse, atol=1e-6)


def test_models_are_built_as_the_docstring_says(example):
    args = example.parse_args(["--smoke"])
    for kind in ("seq/positive", "seq/signed", "tree/positive", "tree/signed"):
        conv = example.build(kind, 16, 1, args).blocks[0].mixer.conv
        assert conv.transitions == kind.split("/")[1]
        if kind.startswith("seq"):
            assert conv.decomposition == "fwd"
        else:
            assert conv.decomposition is None and conv.adjacency == "dag"
    # the Transformer is causal: changing the last bits leaves the earlier predictions alone
    torch.manual_seed(0)
    model = example.build("seq/transformer", 16, 2, args).eval()
    first = example.parity_string(12, torch.Generator().manual_seed(1))
    second = first.clone()
    second.x = first.x.clone()
    second.x[8:] = 1 - second.x[8:]
    with torch.no_grad():
        a, b = model(Batch.from_data_list([first])), model(Batch.from_data_list([second]))
    assert torch.allclose(a[:8], b[:8], atol=1e-6) and not torch.allclose(a[8:], b[8:])


def test_fingerprint_tells_signed_from_positive(example):
    fingerprint = example.main(["--smoke", "--model", "seq/positive,seq/signed,tree/positive,tree/signed",
                                "--fingerprint-only"])
    losses = fingerprint["losses"]
    assert list(losses) == ["seq/positive", "seq/signed", "tree/positive", "tree/signed"]
    assert losses["seq/positive"] != losses["seq/signed"] and losses["tree/positive"] != losses["tree/signed"]
    assert fingerprint["script"] == "examples/state_tracking.py"


def test_help_and_defaults(example, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert text.count("State tracking: parity along sequences") == 1
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: runs/state_tracking)" in text
    args = example.parse_args([])
    assert args.models == list(example.MODELS) and args.seed_list == [0, 1, 2] and args.record is None
    assert example.parse_args(["--model", "tree"]).models == [m for m in example.MODELS if m.startswith("tree/")]
    with pytest.raises(SystemExit):
        example.parse_args(["--test-lengths", "30,256"])  # test strings must be longer than the training ones
