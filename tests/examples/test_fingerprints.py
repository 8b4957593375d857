"""The examples' fingerprints (examples/_common.py): reproducible, sensitive to what the models compute,
compared bit for bit on the recording's kind of CPU; --record writes them, and nothing else writes
to benchmarks/results/."""
import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "examples"))
import _common  # noqa: E402

LRGB_SMALL = ["--layers", "2", "--hidden", "16", "--heads", "2", "--state-dim", "8", "--head-layers", "2",
              "--batch-size", "8"]
IMAGES_SMALL = ["--budget", "6000", "--batch-size", "8"]
TEXT_SMALL = ["--budget", "20000", "--length", "16", "--batch-size", "4"]
STATE_SMALL = ["--smoke"]


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"{name}_example_fp", os.path.join(REPO, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fingerprint(name, argv):
    return load_example(name).main(argv + ["--fingerprint-only"])


@pytest.mark.parametrize("name, small, changed, models, moved", [
    ("lrgb", LRGB_SMALL, ["--state-dim", "4"], ["peptides-mini/chimera", "peptides-mini/gps", "peptides-mini/gcn"],
     ["peptides-mini/chimera"]),
    ("images", IMAGES_SMALL, ["--state-dim", "8"], ["grid/diagonal", "crossscan", "fwdrev", "fwd", "vit"],
     ["grid/diagonal", "crossscan", "fwdrev", "fwd"]),  # the ViT has no state
    ("text", TEXT_SMALL, ["--lr", "0.001"], ["undirected", "line", "hydra", "fwd", "bert"],
     ["undirected", "line", "hydra", "fwd", "bert"]),
    ("state_tracking", STATE_SMALL, ["--state-dim", "8"],
     ["seq/positive", "seq/signed", "seq/transformer", "tree/positive", "tree/signed", "tree/signed-child", "tree/gcn",
      "tree/gin", "tree/gps"],
     ["seq/positive", "seq/signed", "tree/positive", "tree/signed", "tree/signed-child"]),  # the baselines have no state
], ids=["lrgb", "images", "text", "state_tracking"])
def test_fingerprint_is_reproducible_and_moves_with_a_hyperparameter(name, small, changed, models, moved, capsys):
    first, again, other = fingerprint(name, small), fingerprint(name, small), fingerprint(name, small + changed)
    assert list(first["losses"]) == models  # every model of the table
    assert first["losses"] == again["losses"]  # full floats, bit for bit
    assert capsys.readouterr().out.count(_common.FINGERPRINT_PREFIX) == 3
    assert first["steps"] == _common.FINGERPRINT_STEPS and first["argv"] == small
    assert all(len(v) == first["steps"] + 1 for v in first["losses"].values())
    assert _common.fingerprint_mismatches(first, again) == []
    # the models the option changes move by far more than the tolerance between kinds of CPU
    mismatched = _common.fingerprint_mismatches(first, dict(other, cpu="another CPU"))
    assert set(moved) <= {m.split(":")[0] for m in mismatched}, mismatched


def test_mismatches_are_exact_on_the_recordings_kind_of_cpu_and_tolerant_elsewhere():
    recorded = {"cpu": "A (avx2)", "torch": "2.13.0", "threads": 1, "losses": {"m": [1.0, 0.5]}}
    last_bit = dict(recorded, losses={"m": [1.0, 0.5 + 2 ** -53]})
    assert _common.fingerprint_mismatches(recorded, dict(recorded)) == []
    assert _common.fingerprint_mismatches(recorded, last_bit) == ["m: recorded [1.0, 0.5], computed "
                                                                  f"[1.0, {0.5 + 2 ** -53!r}]"]
    for key, value in (("cpu", "B (avx512f)"), ("torch", "2.14.0"), ("threads", 2)):
        elsewhere = dict(last_bit, **{key: value})
        assert _common.fingerprint_mismatches(recorded, elsewhere) == []
        assert _common.fingerprint_mismatches(recorded, dict(elsewhere, losses={"m": [1.0, 0.5001]}))
    assert _common.fingerprint_mismatches(recorded, dict(recorded, losses={"n": [1.0, 0.5]})) == [
        "models: recorded ['m'], computed ['n']"]


def test_without_options():
    argv = ["--record", "--quiet", "--threads=2", "--seeds", "0", "--record", "a.json", "--threads", "1", "--x"]
    assert _common.without_options(argv, ("--record", "--threads")) == ["--quiet", "--seeds", "0", "--x"]


@pytest.mark.parametrize("name", ["images", "text", "state_tracking"])
def test_output_goes_to_runs_unless_recorded(name):
    example = load_example(name)
    args = example.parse_args([])
    assert args.out == os.path.join("runs", name) and args.record is None
    assert example.parse_args(["--record"]).record == ""
    assert _common.record_paths("", f"{name}_cpu") == os.path.join(REPO, "examples", "..", "benchmarks", "results",
                                                                   f"{name}_cpu.json")


@pytest.mark.parametrize("name", ["images", "text", "state_tracking"])
def test_help_prints_the_description_once_and_no_none_default(name, capsys):
    with pytest.raises(SystemExit):
        load_example(name).parse_args(["--help"])
    text = capsys.readouterr().out
    first_line = open(os.path.join(REPO, "examples", f"{name}.py")).read().split("\n", 1)[0].strip('"')
    assert text.count(first_line) == 1
    assert "(default: None)" not in text and "(default: False)" not in text
    assert f"(default: runs/{name})" in text and "torch's choice" in text


def test_record_writes_the_table_with_its_command_and_fingerprint(tmp_path):
    record = tmp_path / "results" / "images_cpu.json"
    argv = ["--limit", "8", "--epochs", "1", "--seeds", "0,1", *IMAGES_SMALL, "--quiet", "--out", str(tmp_path / "run")]
    summary = load_example("images").main(argv + ["--record", str(record)])
    recorded = json.loads(record.read_text())
    assert recorded["table"] == summary["table"]
    assert recorded["command"] == "python examples/images.py " + " ".join(argv)
    assert (tmp_path / "run" / "images_cpu.json").exists() and (tmp_path / "results" / "images_cpu.png").exists()
    fp = recorded["fingerprint"]
    assert fp["script"] == "examples/images.py" and fp["argv"] == argv and fp["threads"] == 1
    # computed in a fresh process at one thread: what the test of the recording recomputes
    assert _common.fingerprint_mismatches(fp, _common.fingerprint_in_subprocess(fp["script"], fp["argv"])) == []
