"""examples/text.py: a few steps on a few windows, the JSON log, the budget, BERT masking, B.1."""
import importlib.util
import json
import math
import os

import torch

REPO = os.path.join(os.path.dirname(__file__), "..", "..")


def load_example():
    spec = importlib.util.spec_from_file_location("text_example", os.path.join(REPO, "examples", "text.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_model_trains_a_few_steps_and_logs(tmp_path):
    budget = 30_000
    summary = load_example().main(["--limit", "16", "--length", "32", "--steps", "3", "--eval-every", "2",
                                   "--warmup", "1", "--batch-size", "8", "--seeds", "0", "--budget", str(budget),
                                   "--quiet", "--out", str(tmp_path), "--tag", "t"])
    logged = json.loads((tmp_path / "text_t.json").read_text())
    assert logged["table"] == summary["table"]
    assert logged["split"] == {"train": 16, "val": 16, "test": 16}
    assert [r["model"] for r in logged["results"]] == ["undirected", "line", "hydra", "fwd", "bert"]
    for row in logged["results"]:
        assert 0.85 * budget <= row["params"] <= budget, row
        (run,) = row["runs"]
        # evaluated at steps 2 and 3 (the last), tested with the weights of the best one
        assert [h["step"] for h in run["history"]] == [2, 3]
        assert run["best"]["step"] in (2, 3)
        best = run["best"]
        assert 0.0 <= best["test_acc"] <= 1.0 and math.isfinite(best["test_ce"]) and best["test_targets"] > 0
        assert all(math.isfinite(h["train_ce"]) and math.isfinite(h["val_ce"]) for h in run["history"])
    assert "| Chimera (undirected line, B.1) |" in logged["table"] and "| BERT (learned positions) |" in logged["table"]
    assert (tmp_path / "text_t.png").stat().st_size > 0


def test_bert_masking_proportions_and_fixed_held_out_masks():
    example = load_example()
    tokens = torch.randint(256, (200_000,))
    inputs, chosen = example.bert_mask(tokens, 0.15, torch.Generator().manual_seed(0))
    assert abs(chosen.float().mean().item() - 0.15) < 0.005
    masked = (inputs[chosen] == example.MASK).float().mean().item()
    kept = (inputs[chosen] == tokens[chosen]).float().mean().item()  # 10% kept, plus random bytes that hit
    assert abs(masked - 0.8) < 0.01 and abs(kept - (0.1 + 0.1 / 256)) < 0.01
    assert torch.equal(inputs[~chosen], tokens[~chosen]) and (inputs[~chosen] != example.MASK).all()
    split = example.load_splits(32, limit=4)["val"]
    first, second = example.fixed_eval_masks(split, 0.15), example.fixed_eval_masks(split, 0.15)
    assert all(torch.equal(a.x, b.x) and torch.equal(a.chosen, b.chosen) for a, b in zip(first, second))
    assert all(torch.equal(a.target, s.x) for a, s in zip(first, split))


def test_splits_are_contiguous_and_disjoint():
    example = load_example()
    text = example.load_text()
    splits = example.load_splits(64)
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes["train"] + sizes["val"] + sizes["test"] == len(text) // 64
    assert sizes["val"] == sizes["test"] == len(text) // 64 // 20
    assert bytes(splits["val"][0].x.tolist()) == text[64 * sizes["train"]:64 * (sizes["train"] + 1)]


def test_undirected_model_is_one_resolvent_on_the_undirected_line():
    # B.1's model mixes over SequenceToLine's undirected edges: without positions it treats a
    # window and its reversal alike (reversed outputs); the two directed lines need not.
    example = load_example()
    from torch_geometric.data import Batch, Data
    from torch_geometric_chimera.transforms import SequenceToLine

    tokens = torch.randint(256, (24,), generator=torch.Generator().manual_seed(0))
    pair = Batch.from_data_list([SequenceToLine()(Data(x=tokens)), SequenceToLine()(Data(x=tokens.flip(0)))])
    for kind, equivariant in (("undirected", True), ("line", False)):
        torch.manual_seed(0)
        model = example.ByteMLM(kind, 24, width=16, layers=2, heads=2, state_dim=4, dropout=0.0,
                                pos_emb="none").double().eval()
        if kind == "undirected":
            assert model.blocks[0].mixer.conv.adjacency == "undirected_line"
            assert model.blocks[0].mixer.conv.decomposition is None
        with torch.no_grad():
            logits = model(pair).view(2, 24, 256)
        assert torch.allclose(logits[0], logits[1].flip(0), atol=1e-9) == equivariant, kind
