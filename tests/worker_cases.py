"""Malformed raw-op calls run in worker processes, so that a call that crashes the interpreter
fails its own case and not the test session (``tests/ops/test_raw_op_safety.py``,
``tests/ops/test_grid_stacked.py``)."""
import json
import os
import subprocess
import sys

import torch_geometric_chimera


def subprocess_env():
    """The environment of a child Python that imports this checkout's package and the tests'
    helpers (this directory)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(torch_geometric_chimera.__file__)))
    tests = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([root, tests] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_cases(worker, cases, *worker_args):
    """``{name: (outcome, message)}`` of ``cases`` (``{name: payload}``) run by the script
    ``worker`` (given ``worker_args``), which reads ``[[name, payload], ...]`` as JSON on stdin and
    prints ``["start", name]`` before each case and ``[name, outcome, message]`` after it. A crash
    is recorded for the case that was running, and a fresh worker goes on with the rest."""
    results, todo = {}, list(cases)
    while todo:
        proc = subprocess.run([sys.executable, "-c", worker, *worker_args],
                              input=json.dumps([(n, cases[n]) for n in todo]), capture_output=True, text=True,
                              env=subprocess_env(), timeout=300)
        running = None
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if record[0] == "start":
                running = record[1]
            else:
                results[record[0]] = (record[1], record[2])
                running = None
        crash = ("crashed", f"exit code {proc.returncode}: {proc.stderr.strip()[-500:]}")
        if running is not None:  # the worker died inside this case
            results[running] = crash
        elif proc.returncode != 0:  # it died outside any case (at import): every case left fails
            results.update({n: crash for n in todo if n not in results})
        todo = [n for n in todo if n not in results]
    return results
