"""benchmarks/gpu_suite.py, the one command for the GPU figures (issue 9, item 5), on the CPU: the
plan of a dry run, figures read from real (tiny) benchmark runs, the test counts of a pytest run,
the refusal without a built extension, and the GPU section that report.py writes from a summary."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.append(BENCHMARKS)

import gpu_suite  # noqa: E402

ROW_KEYS = {"benchmark", "workload", "baseline", "chimera", "ratio", "measured", "target", "target_text", "met"}


def run_suite(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("OUT", None)
    result = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "gpu_suite.py"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    return result, result.stdout[-3000:] + result.stderr[-3000:]


def test_dry_run_plans_every_benchmark_of_the_issue(tmp_path):
    result, output = run_suite("--device", "cpu", "--quick", "--dry-run", "--out", str(tmp_path))
    assert result.returncode == 0, output
    summary = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert summary["suite"] == "gpu_suite" and summary["dry_run"] and summary["quick"]
    assert summary["device_type"] == "cpu"
    for key in ("device", "date", "torch", "triton", "torch_geometric", "python", "command", "extension"):
        assert key in summary, key
    assert "--dry-run" in summary["command"]
    assert summary["tests"]["status"] == "skipped"  # no CUDA tests on a CPU device
    jobs = gpu_suite.jobs_for("cpu")
    assert [b["name"] for b in summary["benchmarks"]] == [job.name for job in jobs]
    for run, job in zip(summary["benchmarks"], jobs):
        assert run["status"] == "dry-run"
        assert job.script in run["command"] and "--device cpu" in run["command"]
        assert run["json"] == str(tmp_path / f"{job.name}.json")
        assert not os.path.exists(run["json"])  # nothing ran
    assert len(summary["rows"]) == sum(len(job.rows) for job in jobs)
    for row in summary["rows"]:
        assert set(row) >= ROW_KEYS
        assert row["met"] is None and row["ratio"] is None
    assert summary["targets"] == {"met": 0, "missed": 0, "not_measured": len(summary["rows"])}
    # Every workload of the issue's table is there, with item 5's targets.
    targets = {row["workload"]: row["target"] for row in summary["rows"]}
    assert sum("one Adam step" in w for w in targets) == 2
    assert sum("mixer alone" in w and t == 0.5 for w, t in targets.items()) == 2
    assert any("dag solve" in w and t == 2.0 for w, t in targets.items())
    assert any("10^6-node" in w and t == 0.25 for w, t in targets.items())
    # The report of a run outside benchmarks/results/gpu goes beside it, with the GPU section.
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## GPU figures (issue 9, item 5) (dry run: nothing measured)" in report
    assert summary["command"] in report
    assert report.count("| not measured: dry-run |") == len(summary["rows"])


def test_quick_run_reads_each_figure_from_its_benchmark(tmp_path):
    result, output = run_suite("--device", "cpu", "--quick", "--only", "dag,line", "--out", str(tmp_path),
                               timeout=180)
    assert result.returncode == 0, output
    summary = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [b["name"] for b in summary["benchmarks"]] == ["dag", "line"]
    assert all(b["status"] == "ok" for b in summary["benchmarks"]), summary["benchmarks"]
    assert os.path.exists(tmp_path / "logs" / "dag.log")
    dag = json.loads((tmp_path / "dag.json").read_text())
    line = json.loads((tmp_path / "line.json").read_text())
    assert dag["width"] == 64 and line["sequences"] == 2  # the quick sizes reached the benchmarks
    rows = {row["benchmark"]: row for row in summary["rows"]}
    assert rows["dag"]["ratio"] == pytest.approx(dag["chimera_dag_solve"]["median_s"] / dag["state_copy"]["median_s"])
    assert rows["line"]["ratio"] == pytest.approx(line["line"]["median_s"] / line["chunked_ssd"]["median_s"])
    for row in rows.values():
        assert row["met"] == (row["ratio"] <= row["target"])
    met = [row["met"] for row in summary["rows"]]
    assert summary["targets"] == {"met": met.count(True), "missed": met.count(False), "not_measured": 0}
    # report.py reads the summary, not the benchmarks' own JSON beside it.
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert report.count("## GPU figures") == 1
    assert f"| {rows['dag']['ratio']:.2f}x | <= 2.0x |" in report


def test_test_counts_come_from_the_junit_report(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_a_cuda(): pass\n"
        "@pytest.mark.parametrize('device', ['cpu', 'cuda'])\n"
        "def test_b(device): assert device == 'cuda'\n"
        "@pytest.mark.skip(reason='no GPU')\n"
        "def test_c_cuda(): pass\n"
        "def test_d_cuda(): raise RuntimeError('broken kernel')\n"
        "def test_e(): pass\n")
    result = gpu_suite.run_tests(["test_sample.py"], "cuda", str(tmp_path / "junit.xml"), str(tmp_path / "log.txt"),
                                 timeout=120, cwd=str(tmp_path))
    # Selected: test_a_cuda, test_b[cuda], test_c_cuda, test_d_cuda; not test_b[cpu] or test_e.
    assert (result["passed"], result["failed"], result["errors"], result["skipped"], result["total"]) == (2, 1, 0, 1, 4)
    assert result["status"] == "failed" and result["returncode"] == 1
    assert "broken kernel" in (tmp_path / "log.txt").read_text()


def test_a_missing_extension_stops_the_suite_with_the_build_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_suite, "extension_status", lambda device_type: {
        "built": False, "cuda_kernels": None, "build_command": gpu_suite.BUILD_COMMAND})
    assert gpu_suite.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not built" in err and gpu_suite.BUILD_COMMAND in err
    assert "build_ext --inplace" in gpu_suite.BUILD_COMMAND
    assert not os.path.exists(tmp_path / "gpu_suite.json")


def test_failed_or_incomplete_benchmarks_are_not_measured(tmp_path):
    job = next(job for job in gpu_suite.jobs_for("cuda") if job.name == "scaling")
    rows = gpu_suite.rows_of(job, {"status": "timeout", "error": "timed out after 5 s"})
    assert [row["met"] for row in rows] == [None, None]
    assert all("timeout" in row["note"] and "5 s" in row["note"] for row in rows)
    # GPSConv out of memory, Chimera in time: the time target is met, the memory ratio not measured.
    result = {"runs": {"gpsconv": {"1000000": {"oom": True, "error": "CUDA out of memory"}},
                       "chimera_auto": {"1000000": {"oom": False, "nodes": 10**6, "seconds": 0.2,
                                                    "peak_rss_mib": 900.0, "peak_cuda_mib": 3000.0}}}}
    path = tmp_path / "scaling.json"
    path.write_text(json.dumps(result))
    time_row, memory_row = gpu_suite.rows_of(job, {"status": "ok", "json": str(path)})
    assert time_row["measured"] == 0.2 and time_row["met"] is True and time_row["ratio"] is None
    assert "out of memory" in time_row["baseline"]
    assert memory_row["ratio"] is None and memory_row["met"] is None
    # A JSON without the figures a row reads is reported, not a crash.
    path.write_text(json.dumps({"runs": {}}))
    rows = gpu_suite.rows_of(job, {"status": "ok", "json": str(path)})
    assert all(row["met"] is None and "lacks" in row["note"] for row in rows)


def test_a_benchmark_that_fails_or_hangs_is_recorded_and_the_suite_goes_on(tmp_path):
    script = tmp_path / "bench_fake.py"
    script.write_text("import sys, time\n"
                      "if sys.argv[1] == 'hang':\n"
                      "    print('started', flush=True); time.sleep(60)\n"
                      "raise ValueError('--size: too large for this device')\n")
    for mode in ("hang", "fail"):
        job = gpu_suite.Job(mode, str(script), [mode], [mode], timeout=60)
        json_path, log = str(tmp_path / f"{mode}.json"), str(tmp_path / f"{mode}.log")
        command = gpu_suite.job_command(job, False, "cpu", json_path, str(tmp_path))
        assert command[1:] == [str(script), mode, "--device", "cpu", "--out", json_path]
        run = gpu_suite.run_job(job, command, json_path, log, timeout=3)
        text = open(log).read()
        if mode == "hang":
            assert run["status"] == "timeout" and run["returncode"] is None and run["seconds"] < 30
            assert "started" in text and "timed out after 3 s" in text
        else:
            assert run["status"] == "failed" and run["returncode"] == 1
            assert run["error"] == "ValueError: --size: too large for this device"


def test_arguments_are_checked_by_name(capsys):
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--only", "dag,nope"])
    assert "--only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--timeout", "0"])
    assert "--timeout" in capsys.readouterr().err


def test_the_tf32x3_row_reads_the_kernels_on_a_gpu_and_the_emulation_elsewhere():
    """Issue 17's row: tf32x3 against ieee in the fused attention, timed only where a GPU ran it."""
    job = next(job for job in gpu_suite.jobs_for("cuda") if job.name == "triton_precision")
    assert job.script == "benchmarks/bench_triton_precision.py"
    extract = job.rows[0].extract
    cpu = {"worst_ratio": 1.69, "default": "tf32x3", "kernels": None}
    figures = extract(cpu)
    assert figures["ratio"] is None and "no GPU" in figures["chimera"] and "1.69x" in figures["note"]
    kernel = {"median_s": 0.002, "max_relative_error": {"y": 1e-7, "L": 2e-7, "q": 1e-7, "k": 1e-7, "v": 1e-7}}
    gpu = dict(cpu, kernels={"tf32x3": kernel, "ieee": dict(kernel, median_s=0.004), "time_ratio": 0.5})
    figures = extract(gpu)
    assert figures["ratio"] == 0.5 and "error 2.0e-07" in figures["chimera"]
