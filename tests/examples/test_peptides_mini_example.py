import importlib.util
import json
import os

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "peptides_mini.py")


def test_main_job_runs_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("peptides_mini_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--epochs", "2", "--limit", "80", "--layers", "2", "--out", str(tmp_path)])
    assert set(results) == {"chimera", "gcn"}
    for result in results.values():
        assert len(result["history"]) == 2
        assert result["history"][-1]["train_mae"] < result["history"][0]["train_mae"] * 1.5
        assert 0 < result["best"]["val"] < 5
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["results"]["chimera"]["params"] > 0
