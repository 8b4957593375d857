"""The README's snippets and commands work as written: each Python snippet alone, from any directory."""
import contextlib
import glob
import importlib.util
import io
import json
import os
import re
import shlex
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)
COMMANDS = [command.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S)
            for line in block.splitlines() for command in line.split("&&")]


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_conv(ns, printed):
    assert tuple(ns["out"].shape) == (5, 64)


def check_function(ns, printed):
    assert tuple(ns["y"].shape) == (5, 2, 4)


def check_gps(ns, printed):
    assert tuple(ns["h"].shape) == (5, 64)


def check_graphgym(ns, printed):
    assert ns["cfg"].chimera.state_dim == 96
    assert printed.split() == ["ChimeraGPSModel", "GCN+Chimera", "96"]  # what the snippet's comment says


def check_images(ns, printed):
    assert tuple(ns["image_batch"].grid_size.shape) == (4, 2)
    assert tuple(ns["pixels"].shape) == (64, 32)
    assert all(tuple(ns[name].shape) == (17, 32) for name in ("both", "causal", "undirected"))
    assert not torch.allclose(ns["both"], ns["causal"])


CHECKS = [check_conv, check_function, check_gps, check_graphgym, check_images]  # one per snippet, in README order


def test_every_snippet_has_a_check():
    assert len(SNIPPETS) == len(CHECKS)


@pytest.mark.parametrize("index", range(len(CHECKS)), ids=[c.__name__[6:] for c in CHECKS])
def test_snippet_runs_alone_from_any_directory(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root: no snippet may rely on relative paths
    namespace, printed = {"__name__": "__main__"}, io.StringIO()  # fresh: nothing from another snippet
    with contextlib.redirect_stdout(printed):
        exec(compile(SNIPPETS[index], f"README.md snippet {index + 1}", "exec"), namespace)
    CHECKS[index](namespace, printed.getvalue())


def test_graphgym_command_parses_as_written(monkeypatch, tmp_path):
    """The README's GraphGym command, with GraphGym's training replaced by a recorder: the arguments
    must reach the config (``--repeat`` after an override used to be read as a config key)."""
    [command] = [c for c in COMMANDS if c.startswith("python examples/graphgym/main.py")]
    argv = shlex.split(command)[2:]
    main = load("examples/graphgym/main.py", "graphgym_main")
    seeds = []
    monkeypatch.setattr(main, "set_out_dir", lambda *args: None)
    monkeypatch.setattr(main, "set_run_dir", lambda *args: None)
    monkeypatch.setattr(main, "dump_cfg", lambda *args: None)
    monkeypatch.setattr(main, "agg_runs", lambda *args: None)
    monkeypatch.setattr(main, "GraphGymDataModule", lambda: None)
    monkeypatch.setattr(main, "create_model", lambda: torch.nn.Linear(1, 1))
    monkeypatch.setattr(main, "train", lambda *args, **kwargs: seeds.append(main.cfg.seed))
    monkeypatch.chdir(ROOT)  # the command is run from the repository root, as the README says
    main.main(argv)
    repeat = int(argv[argv.index("--repeat") + 1])
    assert len(seeds) == repeat and seeds == list(range(seeds[0], seeds[0] + repeat))
    assert main.cfg.dataset.dir == argv[argv.index("dataset.dir") + 1]
    assert main.cfg.model.type == "ChimeraGPSModel"


def test_lrgb_commands_parse():
    example = load("examples/lrgb.py", "lrgb_example_readme")
    commands = [c for c in COMMANDS if "examples/lrgb.py" in c]
    assert len(commands) >= 3
    for command in commands:
        argv = shlex.split(command)
        example.parse_args(argv[argv.index("examples/lrgb.py") + 1:])


def table_rows(text: str):
    """The main-job rows ``(method, score, parameters)`` of a markdown table."""
    return re.findall(r"^\| (Chimera-GPS \(ours\)|GraphGPS\+Transformer|GCN) \| ([0-9.]+)(?: ± [0-9.]+)? \((\d+k)\) \|$",
                      text, re.M)


def test_main_job_table_matches_the_recorded_run():
    """README and BENCHMARKS.md show the numbers of ``benchmarks/results/main_job_cpu.json``
    (written by ``python examples/lrgb.py --no-resume --record benchmarks/results/main_job_cpu.json``)."""
    result = json.load(open(os.path.join(ROOT, "benchmarks", "results", "main_job_cpu.json"), encoding="utf-8"))
    recorded = table_rows(result["table"])
    assert len(recorded) == 3
    readme = README[README.index("## Quick start"):README.index("## Use")]
    assert table_rows(readme) == recorded
    benchmarks = open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8").read()
    assert table_rows(benchmarks[benchmarks.index("## Main job"):]) [:3] == recorded


# Every recorded example table: the main job's, and those of examples/images.py and examples/text.py.
RECORDED_TABLES = sorted(os.path.basename(p) for pattern in ("main_job_*.json", "images_cpu*.json", "text_cpu*.json",
                                                             "state_tracking_cpu*.json")
                         for p in glob.glob(os.path.join(ROOT, "benchmarks", "results", pattern)))


def test_every_example_table_is_checked():
    assert {"main_job_cpu.json", "images_cpu.json", "text_cpu.json", "state_tracking_cpu.json"} <= set(RECORDED_TABLES)


@pytest.mark.parametrize("name", RECORDED_TABLES)
def test_recorded_table_comes_from_this_code(name):
    """The fingerprint recorded with a table (every model of the table, a few optimizer steps on one
    fixed batch at one thread; examples/_common.py) equals the code's, recomputed in a fresh process:
    bit for bit on the recording's kind of CPU (what the README promises), within
    FINGERPRINT_REL_TOL on another. A mismatch means the code no longer computes what the table says:
    rerun the recording's command with --record and update the README."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import _common
    result = json.load(open(os.path.join(ROOT, "benchmarks", "results", name), encoding="utf-8"))
    recorded = result.get("fingerprint")
    if recorded is None:
        pytest.skip(f"{name} was recorded before fingerprints existed, so nothing ties its table to the code: "
                    f"re-record it (its command, as the README quotes it, with --record benchmarks/results/{name})")
    # the fingerprint is the one of the recorded command (at one thread)
    assert _common.without_options(shlex.split(result["command"])[2:], ("--threads",)) == recorded["argv"]
    computed = _common.fingerprint_in_subprocess(recorded["script"], recorded["argv"])
    mismatches = _common.fingerprint_mismatches(recorded, computed)
    assert not mismatches, (
        f"{name} no longer matches the code ({'bit for bit' if recorded['cpu'] == computed['cpu'] else 'within '}"
        f"{'' if recorded['cpu'] == computed['cpu'] else _common.FINGERPRINT_REL_TOL}): rerun "
        f"`{result['command']} --record benchmarks/results/{name}` and update the README's table. "
        + "; ".join(mismatches))
