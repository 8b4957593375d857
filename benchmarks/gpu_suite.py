"""One command for the GPU figures (issue 9, item 5): the CUDA tests, then every benchmark of the
issue's table at its sizes, a summary JSON with each figure against its target, and the GPU
section of BENCHMARKS.md.

    python benchmarks/gpu_suite.py                        # on a CUDA machine: everything, the issue's sizes
    python benchmarks/gpu_suite.py --only line,dag        # a subset (names: --list)
    python benchmarks/gpu_suite.py --device cpu --quick   # smoke run: tiny sizes, one or two reps
    python benchmarks/gpu_suite.py --dry-run              # the plan and an empty summary, nothing run

Steps:

1. Build nothing: the extension must already be built in place (the suite prints the command when
   it is not, or when it was built without its CUDA kernels).
2. On CUDA, run the tests that exercise the GPU (``pytest tests -k "cuda or triton"``: the
   ``[cuda]`` parametrizations, the CUDA-only tests and the Triton kernels, which run on the GPU
   when there is one) and record how many passed, failed and were skipped.
3. Run every benchmark, each in its own process with a timeout, with ``--device`` and its JSON
   written into the results directory; a benchmark that fails or times out is recorded as such and
   the suite goes on.
4. Write ``gpu_suite.json`` there (device, date, versions, command, test counts, and per workload
   the baseline, Chimera, their ratio, the target of issue 9 item 5 and whether it is met), and
   regenerate BENCHMARKS.md with ``report.py`` (its GPU section reads ``gpu_suite.json``).

The results directory (``--out``) defaults to ``$OUT`` when set, else to ``benchmarks/results/gpu``
for CUDA and ``runs/gpu_suite_<device>`` otherwise (a smoke run does not overwrite GPU figures).
BENCHMARKS.md is rewritten in place only when the results are in ``benchmarks/results/gpu``;
otherwise the report goes to ``<out>/BENCHMARKS.md``.
"""
import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_GPU_DIR = os.path.join(HERE, "results", "gpu")
SUMMARY_NAME = "gpu_suite.json"
BUILD_COMMAND = ('CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared" '
                 'LDCXXSHARED="/usr/bin/g++ -shared" MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 '
                 'python3 setup.py build_ext --inplace')
#: The tests that exercise the GPU: every ``[cuda]`` parametrization and CUDA-only test, and the
#: Triton kernels (real kernels on CUDA; on the CPU they only run under the interpreter).
TEST_KEYWORDS = "cuda or triton"


# ----------------------------------------------------------------------------- formatting
def seconds_text(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def mib_text(mib: Optional[float]) -> str:
    if mib is None:
        return "n/a"
    return f"{mib:.0f} MiB" if mib < 1024 else f"{mib / 1024:.2f} GiB"


def ratio_of(value: Optional[float], baseline: Optional[float]) -> Optional[float]:
    """``value / baseline``, or None when either is missing or the baseline is not positive."""
    if value is None or baseline is None or baseline <= 0:
        return None
    return value / baseline


# ----------------------------------------------------------------------------- the workloads
@dataclass
class Row:
    """One line of the summary table: a workload, how to read its figures from the benchmark's
    JSON, and its target. ``extract(result)`` returns ``baseline`` and ``chimera``
    (text), ``ratio`` and optionally ``measured``, the number compared with ``target`` (the ratio
    when absent), and ``note``."""
    workload: str
    target: Optional[float]
    target_text: str
    extract: Callable[[Dict], Dict]


@dataclass
class Job:
    """One benchmark run: a script and its arguments at the issue's sizes (``argv``) and for a
    smoke run (``quick``); the suite adds the device and the output path. ``out_flag`` is the
    script's option for the JSON path."""
    name: str
    script: str
    argv: List[str]
    quick: List[str]
    timeout: int
    rows: List[Row] = field(default_factory=list)
    out_flag: str = "--out"


def lrgb_step_row(task: str) -> Row:
    def extract(r):
        step = r["tasks"][task]["step"]
        gps, chimera = step["gps"]["median_s"], step["chimera"]["median_s"]
        return {"baseline": f"GraphGPS {seconds_text(gps)}", "chimera": seconds_text(chimera),
                "ratio": ratio_of(chimera, gps)}
    return Row(f"full LRGB model, one Adam step, {task} (bench_lrgb_step.py)", 1.0, "<= 1.0x (stretch <= 0.7x)",
               extract)


def main_job_extract(r):
    seconds = r["seconds"]["peptides-mini"]
    gps, chimera = seconds.get("gps"), seconds.get("chimera")
    return {"baseline": f"GraphGPS {gps} s", "chimera": f"{chimera} s", "ratio": ratio_of(chimera, gps)}


def layer_rows(what: str) -> List[Row]:
    key = "chimera_auto_expand2"

    def time_extract(r):
        entry = r[key]
        return {"baseline": f"GPSConv {seconds_text(r['baseline_median_s'])}",
                "chimera": seconds_text(entry["median_s"]), "ratio": ratio_of(entry["median_s"], r["baseline_median_s"])}

    def memory_extract(r):
        gps, chimera = r["gpsconv"].get("peak_bytes"), r[key].get("peak_bytes")
        if gps is None or chimera is None:
            return {"baseline": "n/a", "chimera": "n/a", "ratio": None,
                    "note": "peak memory is measured on CUDA only"}
        return {"baseline": f"GPSConv {mib_text(gps / 2**20)}", "chimera": mib_text(chimera / 2**20),
                "ratio": ratio_of(chimera, gps)}
    return [Row(f"ChimeraConv (auto, expand 2) vs GPSConv, {what}: time", 1.0, "<= 1.0x", time_extract),
            Row(f"ChimeraConv (auto, expand 2) vs GPSConv, {what}: peak memory", 2.0, "<= 2.0x", memory_extract)]


def mixer_row(what: str) -> Row:
    def extract(r):
        return {"baseline": f"official {seconds_text(r['official']['median_s'])}",
                "chimera": seconds_text(r["chimera"]["median_s"]), "ratio": r["ratio"]}
    return Row(f"mixer alone vs the official formulation, {what}", 0.5, "<= 0.5x", extract)


def dag_extract(r):
    return {"baseline": f"copy {seconds_text(r['state_copy']['median_s'])}",
            "chimera": f"{seconds_text(r['chimera_dag_solve']['median_s'])} ({r['levels']} levels)",
            "ratio": r["ratio"]}


def line_extract(r):
    return {"baseline": f"chunked SSD {seconds_text(r['chunked_ssd']['median_s'])}",
            "chimera": seconds_text(r["line"]["median_s"]), "ratio": r["line_vs_ssd"]}


def scaling_runs(r):
    """The largest size both models ran at (or Chimera's largest), and both entries."""
    chimera_runs, gps_runs = r["runs"]["chimera_auto"], r["runs"].get("gpsconv", {})
    size = max(chimera_runs, key=int)
    return size, chimera_runs[size], gps_runs.get(size)


def scaling_time_extract(r):
    size, chimera, gps = scaling_runs(r)
    if chimera["oom"]:
        return {"baseline": "n/a", "chimera": "out of memory", "ratio": None, "measured": None}
    gps_seconds = None if gps is None or gps["oom"] else gps["seconds"]
    return {"baseline": f"GPSConv {'out of memory' if gps_seconds is None else seconds_text(gps_seconds)}",
            "chimera": f"{seconds_text(chimera['seconds'])} ({chimera.get('nodes', size)} nodes)",
            "ratio": ratio_of(chimera["seconds"], gps_seconds), "measured": chimera["seconds"]}


def scaling_memory_extract(r):
    _, chimera, gps = scaling_runs(r)

    def peak(entry):
        if entry is None or entry["oom"]:
            return None
        return entry.get("peak_cuda_mib", entry["peak_rss_mib"])
    kind = "allocated" if "peak_cuda_mib" in chimera else "resident (whole process)"
    return {"baseline": f"GPSConv {mib_text(peak(gps))}", "chimera": f"{mib_text(peak(chimera))} {kind}",
            "ratio": ratio_of(peak(chimera), peak(gps))}


def images_extract(r):
    timings = r["images"]["timings"]
    return {"baseline": f"ViT attention {seconds_text(timings['vit_attention']['median_s'])}",
            "chimera": seconds_text(timings["chimera_grid"]["median_s"]), "ratio": timings["chimera_grid"]["ratio"]}


def text_extract(r):
    timings = r["text"]["timings"]
    return {"baseline": f"SDPA {seconds_text(timings['sdpa_attention']['median_s'])}",
            "chimera": seconds_text(timings["chimera_line"]["median_s"]), "ratio": timings["chimera_line"]["ratio"]}


def triton_precision_extract(r):
    """tf32x3 against ieee in the fused attention kernels (issue 17): time on a GPU, error always
    (emulated on the CPU, measured on the GPU)."""
    note = f"emulated error ratio {r['worst_ratio']:.2f}x float32's (rule <= 2x): default {r['default']}"
    kernels = r.get("kernels")
    if not kernels:
        return {"baseline": "ieee (no GPU)", "chimera": "tf32x3 (no GPU)", "ratio": None, "note": note}
    errors = {name: max(kernels[name]["max_relative_error"].values()) for name in ("tf32x3", "ieee")}
    return {"baseline": f"ieee {seconds_text(kernels['ieee']['median_s'])}, error {errors['ieee']:.1e}",
            "chimera": f"tf32x3 {seconds_text(kernels['tf32x3']['median_s'])}, error {errors['tf32x3']:.1e}",
            "ratio": kernels["time_ratio"], "note": note}


def jobs_for(device_type: str) -> List[Job]:
    """The benchmarks of issue 9's table at its sizes, and their smoke-run sizes."""
    # Issue 10's image target is 0.5x on a GPU, 1.0x on the 2-core CPU.
    image_target = 0.5 if device_type == "cuda" else 1.0
    return [
        Job("lrgb_step", "benchmarks/bench_lrgb_step.py", ["--tasks", "peptides-func,pascalvoc-sp"],
            ["--tasks", "peptides-func,pascalvoc-sp", "--graphs", "2", "--layers", "1", "--reps", "1"], 1200,
            [lrgb_step_row("peptides-func"), lrgb_step_row("pascalvoc-sp")]),
        Job("main_job", "examples/lrgb.py", ["--no-resume", "--quiet", "--out", "{scratch}/lrgb"],
            ["--no-resume", "--quiet", "--out", "{scratch}/lrgb", "--limit", "16", "--epochs", "1"], 3600,
            [Row("main job, python examples/lrgb.py, training seconds", 1.0, "<= 1.0x", main_job_extract)],
            out_flag="--record"),
        Job("layer_uniform", "benchmarks/bench_layer.py",
            ["--graphs-kind", "uniform", "--methods", "auto,dense", "--expands", "2"],
            ["--graphs-kind", "uniform", "--methods", "auto", "--expands", "2", "--graphs", "4", "--reps", "1"], 900,
            layer_rows("64 graphs x 150 nodes")),
        Job("layer_tree", "benchmarks/bench_layer.py",
            ["--graphs-kind", "tree", "--methods", "auto,dense", "--expands", "2"],
            ["--graphs-kind", "tree", "--methods", "auto", "--expands", "2", "--graphs", "4", "--reps", "1"], 900,
            layer_rows("tree batch (64 graphs, 46 sizes)")),
        Job("mixer_tree", "benchmarks/bench_mixer.py", ["--graphs-kind", "tree"],
            ["--graphs-kind", "tree", "--graphs", "3", "--reps", "1"], 600, [mixer_row("tree batch")]),
        Job("mixer_uniform", "benchmarks/bench_mixer.py", ["--graphs-kind", "uniform"],
            ["--graphs-kind", "uniform", "--graphs", "3", "--reps", "1"], 600, [mixer_row("uniform batch")]),
        Job("dag", "benchmarks/bench_dag.py", ["--side", "256", "--width", "1024", "--baseline", "copy"],
            ["--side", "16", "--width", "64", "--baseline", "copy", "--reps", "2"], 600,
            [Row("dag solve, 256x256 grid, H*S*P = 1024, vs a copy of the state", 2.0, "<= 2.0x", dag_extract)]),
        Job("line", "benchmarks/bench_line.py",
            ["--sequences", "8", "--length", "8192", "--heads", "8", "--state", "64", "--head-dim", "64"],
            ["--sequences", "2", "--length", "128", "--heads", "2", "--state", "16", "--head-dim", "16",
             "--reps", "1"], 900,
            [Row("line path vs chunked SSD, 8 x 8192 tokens, 8 heads, S = P = 64", 1.0, "<= 1.0x", line_extract)]),
        Job("scaling", "benchmarks/bench_scaling.py",
            ["--graph", "grid", "--width", "32", "--sizes", "1000000", "--models", "gpsconv,chimera_auto"],
            ["--graph", "grid", "--width", "32", "--sizes", "400", "--models", "gpsconv,chimera_auto"], 1800,
            [Row("one 10^6-node grid graph, width 32: time", 0.25, "<= 0.25 s", scaling_time_extract),
             Row("one 10^6-node grid graph, width 32: peak memory", 1.0, "<= 1.0x GPSConv", scaling_memory_extract)]),
        Job("images_text", "benchmarks/bench_images_text.py", [],
            ["--images", "2", "--side", "8", "--length", "256", "--reps", "1"], 900,
            [Row("64 images of 32x32 patches, grid decomposition vs ViT attention (issue 10)", image_target,
                 f"<= {image_target}x", images_extract),
             Row("text, 4096 tokens, line decomposition vs SDPA (issue 10)", 1.0, "<= 1.0x", text_extract)]),
        Job("triton_precision", "benchmarks/bench_triton_precision.py", [],
            ["--graphs", "8", "--seeds", "1", "--reps", "2"], 900,
            [Row("fused attention, float32 products: tf32x3 vs ieee time, G*H = 256, m = 128 (issue 17)", 1.0,
                 "<= 1.0x", triton_precision_extract)]),
    ]


JOB_NAMES = [job.name for job in jobs_for("cuda")]


# ----------------------------------------------------------------------------- steps
def extension_status(device_type: str) -> Dict:
    """Whether ``torch_geometric_chimera._C`` is built, and on CUDA whether it has its CUDA kernels."""
    import torch

    from torch_geometric_chimera.ops import _extension
    status = {"built": bool(_extension.HAS_EXTENSION), "cuda_kernels": None, "build_command": BUILD_COMMAND}
    if not _extension.HAS_EXTENSION:
        status["error"] = str(_extension.EXTENSION_ERROR)
    elif device_type == "cuda":
        status["cuda_kernels"] = bool(torch._C._dispatch_has_kernel_for_dispatch_key("chimera::dag_solve", "CUDA"))
    return status


def junit_counts(path: str) -> Dict[str, int]:
    """Passed, failed, errors and skipped tests of a pytest ``--junitxml`` report."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "total": counts["tests"]}


def run_logged(command: List[str], log: str, timeout: float, cwd: str = ROOT):
    """Run ``command`` in its own process group with stdout and stderr written to ``log`` (which
    can be followed while it runs). Returns ``(returncode, seconds)``; the return code is None when
    the timeout killed the group (a benchmark's own subprocesses included)."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(['python'] + command[1:])}\n")
        f.flush()
        proc = subprocess.Popen(command, cwd=cwd, env=child_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
            f.write(f"\ntimed out after {timeout:g} s\n")
    return returncode, round(time.perf_counter() - start, 1)


def last_line(log: str) -> str:
    """The last non-empty line of a log: usually the error that ended the run."""
    with open(log, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return (lines[-1] if len(lines) > 1 else "no output")[:300]


def run_tests(paths: List[str], keywords: str, junit: str, log: str, timeout: float, cwd: str = ROOT) -> Dict:
    """``pytest paths -k keywords`` in a subprocess; the counts of its JUnit report and a status:
    ``ok`` (every selected test passed or was skipped), ``failed``, ``timeout`` or ``error`` (no
    report: pytest did not get to run the tests)."""
    command = [sys.executable, "-m", "pytest", *paths, "-k", keywords, "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
    if os.path.exists(junit):
        os.remove(junit)  # a stale report must not pass for this run's
    returncode, seconds = run_logged(command, log, timeout, cwd)
    entry = {"command": " ".join(["python"] + command[1:]), "junit": junit, "log": log, "seconds": seconds,
             "returncode": returncode}
    if returncode is None:
        return {**entry, "status": "timeout", "error": f"timed out after {timeout:g} s"}
    if not os.path.exists(junit):
        return {**entry, "status": "error", "error": last_line(log)}
    counts = junit_counts(junit)
    # pytest exits with 5 when the keywords select no test: nothing failed.
    status = "ok" if counts["failed"] == 0 and counts["errors"] == 0 and returncode in (0, 5) else "failed"
    return {**entry, **counts, "status": status}


def child_env() -> Dict[str, str]:
    """The environment of every subprocess: this checkout first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def job_command(job: Job, quick: bool, device: str, json_path: str, scratch: str) -> List[str]:
    argv = [a.format(scratch=scratch) for a in (job.quick if quick else job.argv)]
    return [sys.executable, job.script, *argv, "--device", device, job.out_flag, json_path]


def run_job(job: Job, command: List[str], json_path: str, log: str, timeout: float) -> Dict:
    """Run one benchmark; ``status`` is ``ok`` (exit 0 and its JSON written), ``failed`` or ``timeout``."""
    if os.path.exists(json_path):
        os.remove(json_path)  # a stale result must not pass for this run's
    returncode, seconds = run_logged(command, log, timeout)
    entry = {"name": job.name, "command": " ".join(["python"] + command[1:]), "json": json_path, "log": log,
             "seconds": seconds, "returncode": returncode}
    if returncode is None:
        return {**entry, "status": "timeout", "error": f"timed out after {timeout:g} s"}
    if returncode != 0 or not os.path.exists(json_path):
        return {**entry, "status": "failed", "error": last_line(log)}
    return {**entry, "status": "ok"}


def rows_of(job: Job, run: Dict) -> List[Dict]:
    """The summary rows of one job: figures read from its JSON when it ran, else its status."""
    result = None
    if run["status"] == "ok":
        with open(run["json"]) as f:
            result = json.load(f)
    rows = []
    for spec in job.rows:
        row = {"benchmark": job.name, "workload": spec.workload, "target": spec.target,
               "target_text": spec.target_text, "baseline": None, "chimera": None, "ratio": None, "measured": None,
               "met": None}
        if result is None:
            row["note"] = f"not measured: {run['status']}" + (f" ({run['error']})" if run.get("error") else "")
        else:
            try:
                figures = spec.extract(result)
            except (KeyError, TypeError, ValueError) as error:
                figures = {"note": f"not measured: {job.name}'s JSON lacks {error}"}
            row.update(figures)
            if row["measured"] is None and "measured" not in figures:
                row["measured"] = row["ratio"]
            if row["measured"] is not None and spec.target is not None:
                row["met"] = row["measured"] <= spec.target
        rows.append(row)
    return rows


def versions() -> Dict[str, Optional[str]]:
    import torch
    import torch_geometric
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "torch_geometric": torch_geometric.__version__, "python": sys.version.split()[0]}


def default_out(device_type: str) -> str:
    if os.environ.get("OUT"):
        return os.environ["OUT"]
    return DEFAULT_GPU_DIR if device_type == "cuda" else os.path.join(ROOT, "runs", f"gpu_suite_{device_type}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda", help="'cuda' (the figures), 'cuda:1', or 'cpu' for a smoke run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one or two reps (a smoke run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands and write the summary with nothing measured")
    parser.add_argument("--only", default=None, help=f"comma list of benchmarks to run, from {JOB_NAMES}")
    parser.add_argument("--list", action="store_true", help="print the benchmarks and their commands, then exit")
    parser.add_argument("--tests", default="auto", choices=["auto", "run", "skip"],
                        help="the GPU tests: auto runs them on CUDA only")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per benchmark (default: each benchmark's own, 10 to 60 minutes)")
    parser.add_argument("--out", default=None, help="results directory (default: see the top of this help)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.only is not None:
        args.only = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in args.only if name not in JOB_NAMES]
        if unknown or not args.only:
            parser.error(f"--only: expected names from {JOB_NAMES}, got {unknown or args.only}")
    if args.timeout is not None and not args.timeout > 0:
        parser.error(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    return parser, args


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    import torch
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    jobs = [job for job in jobs_for(device.type) if args.only is None or job.name in args.only]
    out = os.path.abspath(args.out or default_out(device.type))
    if args.list:
        for job in jobs:
            print(f"{job.name}: {' '.join(job_command(job, args.quick, args.device, job.name + '.json', '<tmp>')[1:])}")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        parser.error(f"--device {args.device}: this machine has no CUDA device (torch {torch.__version__}); "
                     f"pass --device cpu --quick for a smoke run")
    if device.type != "cuda" and not args.quick and not args.dry_run:
        print(f"warning: --device {args.device} without --quick runs the GPU sizes on {device.type}, which can "
              f"take hours; these are not GPU figures")

    sys.path.insert(0, HERE)
    from common import device_name
    extension = extension_status(device.type)
    if not args.dry_run and (not extension["built"] or extension["cuda_kernels"] is False):
        what = ("torch_geometric_chimera._C is not built" if not extension["built"] else
                "torch_geometric_chimera._C was built without its CUDA kernels")
        print(f"{what}. The suite builds nothing; build the extension in place first (from {ROOT}):\n\n"
              f"    {BUILD_COMMAND}\n", file=sys.stderr)
        return 2

    if args.quick and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # A smoke run's timings mean nothing; one thread per benchmark keeps a shared machine from
        # oversubscribing its cores, which slows every process down far more than it helps.
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    os.makedirs(out, exist_ok=True)
    # A dry run may plan a CUDA run on a machine without one: name the device as given then.
    name = args.device if device.type == "cuda" and not torch.cuda.is_available() else device_name(device)
    summary = {"suite": "gpu_suite", "device": name, "device_type": device.type,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **versions(), "command": " ".join(["python", "benchmarks/gpu_suite.py"] + args.argv),
               "quick": args.quick, "dry_run": args.dry_run, "out": out, "extension": extension}
    print(f"GPU suite on {summary['device']}; results in {out}")

    # 2. The GPU tests.
    run_the_tests = args.tests == "run" or (args.tests == "auto" and device.type == "cuda")
    junit, tests_log = os.path.join(out, "tests.xml"), os.path.join(out, "logs", "tests.log")
    if args.dry_run:
        summary["tests"] = {"status": "dry-run" if run_the_tests else "skipped", "keywords": TEST_KEYWORDS}
    elif not run_the_tests:
        summary["tests"] = {"status": "skipped", "keywords": TEST_KEYWORDS,
                            "reason": "no CUDA device" if args.tests == "auto" else "--tests skip"}
    else:
        print(f"tests: pytest tests -k {TEST_KEYWORDS!r} ...", flush=True)
        summary["tests"] = {"keywords": TEST_KEYWORDS,
                            **run_tests(["tests"], TEST_KEYWORDS, junit, tests_log, args.timeout or 3600)}
    print(f"tests: {describe_tests(summary['tests'])}", flush=True)

    # 3. The benchmarks.
    summary["benchmarks"], summary["rows"] = [], []
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as scratch:
        for job in jobs:
            json_path = os.path.join(out, f"{job.name}.json")
            command = job_command(job, args.quick, args.device, json_path, scratch)
            log = os.path.join(out, "logs", f"{job.name}.log")
            if args.dry_run:
                run = {"name": job.name, "command": " ".join(["python"] + command[1:]), "json": json_path,
                       "log": log, "status": "dry-run"}
                print(f"{job.name}: {run['command']}")
            else:
                print(f"{job.name}: {' '.join(command[1:])}", flush=True)
                run = run_job(job, command, json_path, log, args.timeout or job.timeout)
            rows = rows_of(job, run)
            summary["benchmarks"].append(run)
            summary["rows"] += rows
            if not args.dry_run:
                print(f"  {run['status']} in {run['seconds']} s" + (f": {run['error']}" if run.get("error") else ""))
                for row in rows:
                    print(f"  {row_text(row)}", flush=True)
    met = [row["met"] for row in summary["rows"]]
    summary["targets"] = {"met": met.count(True), "missed": met.count(False), "not_measured": met.count(None)}

    # 4. The summary and BENCHMARKS.md.
    summary_path = os.path.join(out, SUMMARY_NAME)
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nwrote {summary_path}: targets met {summary['targets']['met']}, missed {summary['targets']['missed']}, "
          f"not measured {summary['targets']['not_measured']}")
    if not args.no_report:
        import report
        in_repo = os.path.realpath(out) == os.path.realpath(DEFAULT_GPU_DIR)
        report.main(["--gpu-dir", out] + ([] if in_repo else ["--output", os.path.join(out, "BENCHMARKS.md")]))
    failed = summary["tests"]["status"] in ("failed", "error", "timeout") or any(
        run["status"] in ("failed", "timeout") for run in summary["benchmarks"])
    return 1 if failed else 0


def describe_tests(tests: Dict) -> str:
    if "passed" not in tests:
        return tests["status"] + (f" ({tests['reason']})" if tests.get("reason") else "")
    return (f"{tests['status']}: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped in {tests['seconds']} s")


def row_text(row: Dict) -> str:
    ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.3g}x"
    met = {True: "met", False: "MISSED", None: "not measured"}[row["met"]]
    return (f"{row['workload']}: {row['baseline']} | {row['chimera']} | {ratio} | target {row['target_text']}: {met}"
            + (f" ({row['note']})" if row.get("note") else ""))


if __name__ == "__main__":
    sys.exit(main())
