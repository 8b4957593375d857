"""examples/lrgb.py end to end on fixture files in LRGB's raw format (no network)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from torch_geometric_chimera.lrgb import LRGB_TASKS

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
EXAMPLE = os.path.join(REPO, "examples", "lrgb.py")
SMALL = ["--layers", "2", "--hidden", "16", "--heads", "2", "--state-dim", "8", "--head-layers", "2", "--quiet"]


def load_example():
    spec = importlib.util.spec_from_file_location("lrgb_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def test_every_task_and_model_runs_one_epoch(lrgb_root, tmp_path):
    summary = load_example().main(["--root", lrgb_root, "--epochs", "1", "--seeds", "0,1", *SMALL,
                                   "--out", str(tmp_path)])
    assert set(summary["runs"]) == set(LRGB_TASKS)
    for dataset, per_model in summary["runs"].items():
        assert set(per_model) == {"chimera", "gps", "gcn"}
        for runs in per_model.values():
            assert [r["seed"] for r in runs] == [0, 1] and all(r["finished"] for r in runs)
            assert all(0 <= r["best"]["test"] < 10 for r in runs)
        # equal budget: the baselines are sized to Chimera's parameter count, never above it
        chimera = per_model["chimera"][0]["params"]
        assert all(per_model[m][0]["params"] <= chimera for m in ("gps", "gcn"))
    table = (tmp_path / "table.md").read_text()
    assert "| Chimera-GPS (ours) |" in table and " ± " in table and "Peptides-Func AP" in table
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    history = json.loads((tmp_path / "pascalvoc-sp" / "chimera" / "seed1" / "history.json").read_text())
    assert history["epoch"] == 1 and len(history["history"]) == 1


def test_resumed_run_equals_uninterrupted_run(lrgb_root, tmp_path):
    example = load_example()
    common = ["--root", lrgb_root, "--dataset", "peptides-func", "--model", "chimera", "--seeds", "0",
              "--epochs", "3", "--dropout", "0.2", *SMALL]
    example.main(common + ["--out", str(tmp_path / "straight")])
    example.main(common + ["--out", str(tmp_path / "resumed"), "--stop-after", "1"])
    checkpoint = os.path.join("peptides-func", "chimera", "seed0", "checkpoint.pt")
    interrupted = torch.load(tmp_path / "resumed" / checkpoint, weights_only=False)
    assert interrupted["epoch"] == 1
    example.main(common + ["--out", str(tmp_path / "resumed")])
    straight, resumed = (torch.load(tmp_path / d / checkpoint, weights_only=False) for d in ("straight", "resumed"))
    assert resumed["epoch"] == straight["epoch"] == 3
    assert straight["model"].keys() == resumed["model"].keys()
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key
    assert straight["history"] == [dict(h, seconds=s["seconds"]) for h, s in zip(resumed["history"],
                                                                                  straight["history"])]
    assert not torch.equal(interrupted["model"]["layers.0.chimera.in_proj.weight"],
                           resumed["model"]["layers.0.chimera.in_proj.weight"])
    with pytest.raises(SystemExit, match="other hyperparameters"):
        example.main(common + ["--layers", "1", "--out", str(tmp_path / "resumed")])


def test_refuses_to_run_over_budget(lrgb_root, tmp_path):
    example = load_example()
    args = ["--root", lrgb_root, "--dataset", "peptides-struct", "--model", "chimera", "--epochs", "1",
            "--seeds", "0", "--layers", "1", "--hidden", "512", "--heads", "2", "--quiet", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="over the --budget of 500,000; pass --allow-over-budget"):
        example.main(args)
    summary = example.main(args + ["--allow-over-budget"])
    assert summary["runs"]["peptides-struct"]["chimera"][0]["params"] > 500_000


def test_main_job_on_the_shipped_dataset(tmp_path):
    summary = load_example().main(["--epochs", "1", "--limit", "64", *SMALL, "--out", str(tmp_path)])
    assert list(summary["runs"]) == ["peptides-mini"]
    assert set(summary["runs"]["peptides-mini"]) == {"chimera", "gps", "gcn"}


def test_torchrun_with_two_gloo_processes(lrgb_root, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               EXAMPLE, "--root", lrgb_root, "--dataset", "peptides-struct", "--model", "chimera",
               "--epochs", "2", "--seeds", "0", "--device", "cpu", *SMALL, "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["runs"]["peptides-struct"]["chimera"][0]["finished"]
    assert "world size 2" in result.stdout
