"""examples/images.py: one short epoch on a few digits, the JSON log, the budget and the symmetry."""
import importlib.util
import json
import math
import os

import pytest
import torch

pytest.importorskip("sklearn")

REPO = os.path.join(os.path.dirname(__file__), "..", "..")


def load_example():
    spec = importlib.util.spec_from_file_location("images_example", os.path.join(REPO, "examples", "images.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_model_runs_one_epoch_and_logs(tmp_path):
    budget = 12_000
    summary = load_example().main(["--limit", "24", "--epochs", "1", "--warmup", "0", "--seeds", "0,1",
                                   "--budget", str(budget), "--quiet", "--out", str(tmp_path), "--tag", "t"])
    logged = json.loads((tmp_path / "images_t.json").read_text())
    assert logged["table"] == summary["table"]
    assert logged["split"] == {"train": 24, "val": 24, "test": 24}
    assert [r["model"] for r in logged["results"]] == ["grid", "crossscan", "fwdrev", "fwd", "vit"]
    assert logged["results"][0]["sharing"] == "diagonal"
    for row in logged["results"]:
        # equal budget: every model fits it and fills at least 85% of it
        assert 0.85 * budget <= row["params"] <= budget, row
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        for run in row["runs"]:
            assert run["best"]["epoch"] == 1 and len(run["history"]) == 1
            assert 0.0 <= run["best"]["test_acc"] <= 1.0 and math.isfinite(run["best"]["test_loss"])
            assert math.isfinite(run["history"][0]["train_loss"]) and run["seconds"] > 0
    assert "| Chimera (2D grid DAGs) | diagonal |" in logged["table"] and " ± " in logged["table"]
    assert (tmp_path / "images_t.png").stat().st_size > 0


def test_sharing_all_runs_the_grid_model_once_per_mode(tmp_path):
    summary = load_example().main(["--model", "grid", "--sharing", "all", "--limit", "8", "--epochs", "1",
                                   "--seeds", "0", "--budget", "8000", "--quiet", "--out", str(tmp_path)])
    rows = summary["results"]
    assert [r["sharing"] for r in rows] == ["none", "complete", "row", "diagonal"]
    # fewer B/C parameter sets leave room for a wider model
    assert rows[1]["width"] >= rows[3]["width"] >= rows[0]["width"]


def test_grid_model_tells_a_digit_from_its_rotation_with_or_without_positions():
    # Summing the grid DAGs with shared, direction-blind weights saw a digit and its 180° rotation
    # alike (6 vs 9); the direction-aware convolution and selectivity do not need position
    # embeddings to tell them apart (issue 16).
    example = load_example()
    from torch_geometric.data import Batch, Data
    from torch_geometric_chimera.transforms import ImageToGrid

    torch.manual_seed(0)
    image = torch.rand(1, 8, 8, dtype=torch.float64)
    pair = Batch.from_data_list([ImageToGrid()(Data(x=image)), ImageToGrid()(Data(x=image.flip(1, 2)))])
    for kind in ("grid", "crossscan"):
        for pos_emb in ("none", "learned"):
            torch.manual_seed(1)
            model = example.DigitClassifier(kind, 1, 8, width=16, layers=2, heads=2, state_dim=4,
                                            sharing="diagonal", dropout=0.0, pos_emb=pos_emb).double().eval()
            with torch.no_grad():
                logits = model(pair)
            assert (logits[0] - logits[1]).abs().max() > 1e-6, (kind, pos_emb)


def test_missing_scikit_learn_says_what_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match="pip install scikit-learn"):
        load_example().main(["--limit", "4", "--epochs", "1", "--seeds", "0", "--quiet"])


def test_default_positions_follow_each_models_authors():
    # --pos-emb auto (the default): the ViT with learned position embeddings, the SSMs without (the
    # authors' Chimera image config: use_pos_embed: false); 'learned' and 'none' apply to every model.
    example = load_example()
    args = example.parse_args([])
    assert args.pos_emb == "auto"
    for kind in example.MODELS:
        model = example.build(kind, 16, args, "diagonal")
        assert (model.pos is not None) == (kind == "vit"), kind
        for pos_emb, has in (("learned", True), ("none", False)):
            assert (example.build(kind, 16, example.parse_args(["--pos-emb", pos_emb]), "diagonal").pos
                    is not None) == has, (kind, pos_emb)
    with pytest.raises(ValueError, match="pos_emb: expected one of"):
        example.pos_emb_of("grid", "sinusoidal")
