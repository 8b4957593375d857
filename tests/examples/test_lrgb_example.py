"""examples/lrgb.py end to end on fixture files in LRGB's raw format (no network)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._pytree import tree_map

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


def test_resume_when_checkpoint_tensors_load_off_the_cpu(lrgb_root, tmp_path, monkeypatch):
    # On a GPU, torch.load(map_location=cuda) put the saved RNG state on the GPU and resuming died
    # in torch.set_rng_state with "RNG state must be a torch.ByteTensor". Here the meta device
    # stands in for the GPU: every ByteTensor of a loaded checkpoint comes back off the CPU.
    example = load_example()
    common = ["--root", lrgb_root, "--dataset", "peptides-func", "--model", "chimera", "--seeds", "0",
              "--epochs", "2", "--dropout", "0.2", *SMALL]
    example.main(common + ["--out", str(tmp_path / "straight")])
    example.main(common + ["--out", str(tmp_path / "resumed"), "--stop-after", "1"])
    load = torch.load

    def load_onto_another_device(*args, **kwargs):
        return tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) and t.dtype == torch.uint8 else t,
                        load(*args, **kwargs))

    monkeypatch.setattr(torch, "load", load_onto_another_device)
    example.main(common + ["--out", str(tmp_path / "resumed")])
    monkeypatch.undo()
    checkpoint = os.path.join("peptides-func", "chimera", "seed0", "checkpoint.pt")
    straight, resumed = (torch.load(tmp_path / d / checkpoint, weights_only=False) for d in ("straight", "resumed"))
    assert resumed["epoch"] == 2
    for key in straight["model"]:  # dropout draws from the restored generator: same model bit for bit
        assert torch.equal(straight["model"][key], resumed["model"][key]), key
    assert isinstance(resumed["rng"][0]["cpu"], bytes)  # the checkpoint holds no tensor a map_location can move


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_keeps_every_cuda_generator(lrgb_root, tmp_path):
    load_example().main(["--root", lrgb_root, "--dataset", "peptides-func", "--model", "chimera", "--seeds", "0",
                         "--epochs", "1", "--device", "cuda", *SMALL, "--out", str(tmp_path)])
    saved = torch.load(tmp_path / "peptides-func" / "chimera" / "seed0" / "checkpoint.pt", weights_only=False)
    assert len(saved["rng"][0]["cuda"]) == torch.cuda.device_count()


def test_same_seed_same_numbers_whatever_the_environments_thread_count(tmp_path):
    # The thread count changes the order of CPU floating-point sums, and training amplifies the last
    # bit into the second decimal: the command pins it (--threads, default 1) whatever the caller has.
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                   PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        result = subprocess.run([sys.executable, EXAMPLE, "--model", "gcn,gps", "--epochs", "2", "--limit", "128",
                                 "--quiet", "--out", str(tmp_path / threads)], env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    for model in ("gcn", "gps"):
        a, b = (torch.load(tmp_path / d / "peptides-mini" / model / "seed0" / "checkpoint.pt", weights_only=False)
                for d in ("1", "2"))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), model
        assert a["history"] == [dict(h, seconds=s["seconds"]) for h, s in zip(b["history"], a["history"])]
    first, second = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("1", "2"))
    assert first["runs"] == second["runs"]
    assert first["threads"] == second["threads"] == 1


def test_a_second_run_says_it_reprints_and_names_no_resume(tmp_path, capsys):
    example = load_example()
    args = ["--model", "gcn", "--epochs", "1", "--limit", "16", *SMALL, "--out", str(tmp_path)]
    example.main(args)
    assert "--no-resume" in capsys.readouterr().out.strip().splitlines()[-1]
    summary = example.main(args)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "1 of 1 runs had already finished" in last and "not trained again" in last and "--no-resume" in last
    assert summary["runs"]["peptides-mini"]["gcn"][0]["trained_epochs"] == 0
    assert summary["seconds"] == {"peptides-mini": {"gcn": 0}}
    summary = example.main(args + ["--no-resume"])
    assert summary["runs"]["peptides-mini"]["gcn"][0]["trained_epochs"] == 1


def test_help_prints_the_description_once_and_every_default(capsys):
    with pytest.raises(SystemExit):
        load_example().parse_args(["--help"])
    text = capsys.readouterr().out
    assert text.count("Chimera-GPS against the GraphGPS Transformer") == 1
    assert "(default: 500000)" in text and "(default: runs/lrgb)" in text and "(default: 1)" in text
    assert "(default: None)" not in text
    flat = " ".join(text.split())
    assert "--lr LR default: 0.002 (peptides-mini), 0.001 (peptides), 0.0035 (superpixels)" in flat


def test_record_writes_the_benchmark_result(tmp_path):
    record = tmp_path / "results" / "main_job_cpu.json"
    load_example().main(["--model", "gcn", "--epochs", "1", "--limit", "16", *SMALL, "--out", str(tmp_path / "run"),
                         "--record", str(record)])
    result = json.loads(record.read_text())
    assert result["command"] == "python examples/lrgb.py --model gcn --epochs 1 --limit 16 " + " ".join(SMALL) + \
        f" --out {tmp_path / 'run'}"
    assert result["table"] == (tmp_path / "run" / "table.md").read_text().strip()
    threads = torch.get_num_threads()  # called in-process: the caller's count, recorded as it is
    assert result["threads"] == threads and f"{threads} thread" in result["device"]
    assert (tmp_path / "results" / "main_job_learning_curves.png").stat().st_size > 0


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
