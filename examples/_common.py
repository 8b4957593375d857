"""Pieces shared by the examples (run as scripts: each puts this folder on ``sys.path``)."""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional: a plain iterator, or a bar that does nothing
    def tqdm(iterable=None, **kwargs):
        class _Bar:
            def update(self, n=1):
                pass

            def close(self):
                pass
        return _Bar() if iterable is None else iterable


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def warmup_cosine(optimizer, warmup: int, total: int):
    """Linear warmup over ``warmup`` scheduler steps, then cosine decay to 0 at ``total``."""
    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's description of it."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return name


def machine_description(device: torch.device) -> str:
    """CPU (or GPU) model, cores, torch version and threads, for the log and the printed table."""
    name = cpu_name()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


class Block(nn.Module):
    """Pre-norm residual block: ``mixer``, then a 2x MLP."""

    def __init__(self, mixer: nn.Module, width: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, data) -> Tensor:
        x = x + self.dropout(self.mixer(self.norm1(x), data))
        return x + self.dropout(self.mlp(self.norm2(x)))


def width_for_budget(build: Callable[[int], nn.Module], attention: bool, heads: int, budget: int, name: str) -> int:
    """The largest width whose model ``build(width)`` fits ``budget`` parameters: a multiple of
    ``heads`` for attention, of ``heads / gcd(heads, 2)`` for Chimera (its inner width ``2 * width``
    splits into heads)."""
    step = heads if attention else heads // math.gcd(heads, 2)
    width = step
    if count_parameters(build(width)) > budget:
        raise SystemExit(f"--budget {budget:,} is too small for {name} at width {width}")
    while count_parameters(build(width + step)) <= budget:
        width += step
    return width


def mean_std(values: List[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` of ``values * scale`` over seeds (the population std, as the papers report)."""
    t = torch.tensor(values, dtype=torch.float64) * scale
    return f"{t.mean():.{digits}f} ± {t.std(unbiased=False):.{digits}f}"


def pyplot():
    """matplotlib's pyplot on the file backend, or None (with a message) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    return plt


# ----------------------------------------------------------------------------- command line
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default (options whose default is None or
    a flag say what it means in their help instead of showing ``None`` or ``False``)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def without_options(argv: Sequence[str], names: Sequence[str]) -> List[str]:
    """``argv`` without the options ``names`` and their values (``--name value`` or ``--name=value``;
    a following word that starts with ``-`` is the next option, not a value)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            if not arg.startswith("-"):
                continue
        if arg in names:
            skip = True
        elif not any(arg.startswith(name + "=") for name in names):
            out.append(arg)
    return out


def add_run_arguments(parser, stem: str, out_help: Optional[str] = None) -> None:
    """The options every recorded example shares: where it runs (--device, --threads), where it writes
    (--out, --tag, --record), --quiet and --fingerprint-only. ``stem``: the file names' stem."""
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', ...")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads, set as OMP_NUM_THREADS and MKL_NUM_THREADS before torch starts (default: "
                             "the environment's, else torch's choice: every core)")
    parser.add_argument("--out", default=os.path.join("runs", stem),
                        help=out_help or f"folder of the JSON log {stem}_<tag>.json and the plot {stem}_<tag>.png")
    parser.add_argument("--tag", default=None, help="file name tag (default: the device type)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--record", nargs="?", const="", default=None, metavar="JSON",
                        help=f"also write the JSON log, with the command and the code's fingerprint, to JSON and the "
                             f"plot beside it (without a value: benchmarks/results/{stem}_<tag>.json, the recorded "
                             f"results the README quotes)")
    parser.add_argument("--fingerprint-only", action="store_true",
                        help="train nothing: print the code's fingerprint (every model of the table, seed 0, "
                             "a few optimizer steps on the first training batch) that --record stores")


def note_threads_of_this_process(threads: int) -> None:
    """Called from Python with torch already running, ``--threads`` cannot apply: torch.set_num_threads
    would break torch's CPU LU (see examples/_threads.py), so the caller's thread count stays."""
    if threads and threads > 0 and threads != torch.get_num_threads():
        print(f"--threads {threads} applies when this file runs as a command; running with the "
              f"{torch.get_num_threads()} threads of this process")


def resolve_device(name: str) -> torch.device:
    """``--device``: ``"auto"`` is CUDA where there is one, else the CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def fingerprint_first(args, script: str, fingerprint: Callable) -> tuple:
    """``(fingerprint, None)`` for ``--fingerprint-only`` (printed, for :func:`fingerprint_in_subprocess`);
    else ``(None, the fingerprint --record stores)``, computed first, in a fresh process, before
    anything can change the code (``None`` without ``--record``)."""
    if args.fingerprint_only:
        result = fingerprint(args)
        print_fingerprint(result)
        return result, None
    return None, (fingerprint_in_subprocess(script, args.argv) if args.record is not None else None)


def record_result(summary: Dict, script: str, argv: Sequence[str], path: str, png: str, fingerprint: Dict):
    """The JSON log of ``script`` as a recorded result, with its command and the code's fingerprint;
    the plot beside it (``--record`` of images.py and text.py)."""
    import shutil
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    command = f"python {script} " + " ".join(without_options(argv, ("--record",)))
    with open(path, "w") as f:
        json.dump({**summary, "command": command.strip(), "fingerprint": fingerprint}, f, indent=1)
    if os.path.exists(png):
        shutil.copyfile(png, os.path.splitext(path)[0] + ".png")
    print(f"recorded {path} (and its plot); the README quotes its table")


def record_paths(record: str, default_stem: str) -> str:
    """Where ``--record`` writes: the path given, or ``benchmarks/results/<default_stem>.json`` of this
    repository when the flag comes without one."""
    if record:
        return record
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "results",
                        default_stem + ".json")


# ----------------------------------------------------------------------------- fingerprints
# A recorded table is tied to the code that computed it by a fingerprint: every model of the table,
# built as the table builds it (same options, width, seed 0), takes FINGERPRINT_STEPS optimizer steps
# on one fixed small batch of the shipped data at one thread; the fingerprint is the loss before each
# step and after the last one, as full floats. Any change to what the models compute (a kernel that
# sums in another order included) moves these losses, so the recording stops matching the code
# (tests/test_readme.py). One thread and the same kind of CPU make them bit-for-bit reproducible;
# another CPU (or torch) rounds differently, and there only FINGERPRINT_REL_TOL is asked.
FINGERPRINT_STEPS = 3
FINGERPRINT_REL_TOL = 1e-4
FINGERPRINT_PREFIX = "FINGERPRINT "


def fingerprint_losses(model: nn.Module, optimizer, loss_of: Callable[[], Tensor], clip: Optional[float] = None,
                       steps: int = FINGERPRINT_STEPS) -> List[float]:
    """The training loss of ``model`` before each of ``steps`` optimizer steps on the one batch that
    ``loss_of()`` computes the loss of (train mode: dropout draws from the seeded generator), then its
    loss in eval mode after the last step."""
    losses = []
    for _ in range(steps):
        model.train()
        optimizer.zero_grad()
        loss = loss_of()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        losses.append(loss_of().item())
    return losses


def cpu_kind() -> str:
    """The CPU's model name and widest vector extension: what decides the rounding of the kernels
    (MKL and the extension's ``target_clones`` pick their code by it)."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        pass
    isa = next((f for f in ("amx_tile", "avx512f", "avx2", "avx", "sse4_2") if f in flags), platform.machine())
    return f"{cpu_name()} ({isa})"


def fingerprint_record(script: str, argv: Sequence[str], batch: int, losses: Dict[str, List[float]]) -> Dict:
    """The fingerprint as recorded: the losses per model and what they depend on."""
    return {"script": script, "argv": list(argv), "steps": FINGERPRINT_STEPS, "batch": batch,
            "threads": torch.get_num_threads(), "cpu": cpu_kind(), "torch": torch.__version__, "losses": losses}


def print_fingerprint(fingerprint: Dict):
    """The line :func:`fingerprint_in_subprocess` reads back."""
    print(FINGERPRINT_PREFIX + json.dumps(fingerprint), flush=True)


def fingerprint_in_subprocess(script: str, argv: Sequence[str], timeout: float = 600) -> Dict:
    """``python <script> <argv> --fingerprint-only`` at one thread (set in the environment before torch
    starts, whatever the caller runs at), in a fresh process: how a recording and its test compute it.
    ``script`` is relative to the repository root."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    argv = without_options(argv, ("--threads", "--record", "--fingerprint-only")) + ["--fingerprint-only",
                                                                                     "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join(root, script), *argv], capture_output=True, text=True,
                            env=env, timeout=timeout, cwd=root)
    lines = [line for line in result.stdout.splitlines() if line.startswith(FINGERPRINT_PREFIX)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{script} {' '.join(argv)} failed (exit code {result.returncode}):\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len(FINGERPRINT_PREFIX):])


def fingerprint_mismatches(recorded: Dict, computed: Dict) -> List[str]:
    """What differs between two fingerprints of the same command: bit for bit on the CPU model, torch
    and thread count of the recording, within FINGERPRINT_REL_TOL elsewhere. Empty when they match."""
    if set(recorded["losses"]) != set(computed["losses"]):
        return [f"models: recorded {sorted(recorded['losses'])}, computed {sorted(computed['losses'])}"]
    same_kind = all(recorded[k] == computed[k] for k in ("cpu", "torch", "threads"))
    out = []
    for name, losses in recorded["losses"].items():
        now = computed["losses"][name]
        if len(now) != len(losses) or not all(
                a == b if same_kind else math.isclose(a, b, rel_tol=FINGERPRINT_REL_TOL) for a, b in zip(losses, now)):
            out.append(f"{name}: recorded {losses}, computed {now}")
    return out


# ----------------------------------------------------------------------------- plots
def plot_seeds(ax, runs: List[Dict], x_key: str, y: Callable[[Dict], float], label: str, color=None):
    """The mean over seeds of ``y(history entry)`` against ``x_key`` as a line (labelled with the seed
    count), and every seed as a thin line of the same colour. Returns the colour."""
    length = min(len(r["history"]) for r in runs)  # unfinished runs: the epochs every seed has
    xs = [h[x_key] for h in runs[0]["history"][:length]]
    values = [[y(h) for h in r["history"][:length]] for r in runs]
    mean = [sum(v) / len(v) for v in zip(*values)]
    seeds = f"mean of {len(runs)} seeds" if len(runs) > 1 else f"seed {runs[0]['seed']}"
    line, = ax.plot(xs, mean, color=color, label=f"{label} ({seeds})")
    if len(runs) > 1:
        for v in values:
            ax.plot(xs, v, color=line.get_color(), linewidth=0.6, alpha=0.35)
    return line.get_color()
