"""Running a test file's Triton kernels on the CPU: Triton's interpreter needs ``TRITON_INTERPRET=1``
before Triton is first imported (it decorates its own library functions then), so a test file runs
itself again in a subprocess with the variable set, where its kernel tests run on tiny CPU tensors."""
import os
import re
import subprocess
import sys
from typing import List, Tuple

import pytest
import torch

#: Characters of the subprocess's output an assertion message shows at most (about that: the cuts
#: fall on line boundaries and are marked).
REPORT_CHARS = 12000


def kernel_device(interpreted: bool) -> str:
    """Where the kernels run in this process: CUDA when there is one (and not interpreting), else CPU."""
    return "cuda" if torch.cuda.is_available() and not interpreted else "cpu"


def needs_kernels(interpreted: bool):
    """Marks a test that runs Triton kernels: skipped unless this process interprets them or has CUDA."""
    return pytest.mark.skipif(not (interpreted or kernel_device(interpreted) == "cuda"),
                              reason="the kernels run on CUDA or under TRITON_INTERPRET=1 (the subprocess of "
                                     "test_kernels_in_the_interpreter)")


def _keep_lines(lines: List[str], ranges: List[Tuple[int, int]]) -> str:
    """``lines[a:b]`` for every ``(a, b)`` of ``ranges`` (merged where they overlap), a marker for each gap."""
    kept, end = [], 0
    for start, stop in sorted((max(0, a), min(len(lines), b)) for a, b in ranges):
        if stop <= end:
            continue
        if start > end:
            kept.append(f"[... {start - end} lines cut ...]")
        kept.extend(lines[max(start, end):stop])
        end = stop
    if end < len(lines):
        kept.append(f"[... {len(lines) - end} lines cut ...]")
    return "\n".join(kept)


def _lines_within(lines: List[str], chars: int, from_end: bool = False) -> int:
    """How many lines from the start (or the end) of ``lines`` fit in about ``chars`` characters (at least 1)."""
    total, count = 0, 0
    for line in (reversed(lines) if from_end else lines):
        total += len(line) + 1
        if total > chars and count:
            break
        count += 1
    return count


def clip(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else its head, its first ``E`` block (pytest's
    error lines, with the lines that lead to them) and its tail, each a part of ``limit``, with any
    overlong line cut short."""
    if len(text) <= limit:
        return text
    width = max(80, limit // 8)
    lines = [line if len(line) <= width else f"{line[:width]} [... {len(line) - width} characters cut]"
             for line in text.splitlines()]
    head = _lines_within(lines, limit // 4)
    tail = _lines_within(lines, limit // 4, from_end=True)
    ranges = [(0, head), (len(lines) - tail, len(lines))]
    first = next((i for i, line in enumerate(lines) if line.startswith("E ")), None)
    if first is not None:
        last = first
        while last + 1 < len(lines) and lines[last + 1].startswith("E "):
            last += 1
        before = _lines_within(lines[:first], limit // 8, from_end=True)
        after = min(last + 3, len(lines))  # the error lines and the location under them
        while after - (first - before) > 1 and sum(len(x) + 1 for x in lines[first - before:after]) > limit // 2:
            after -= 1
        ranges.append((first - before, after))
    return _keep_lines(lines, ranges)


def _sections(output: str) -> List[Tuple[str, str]]:
    """pytest's ``==== name ====`` sections of ``output``: ``(name, body)``, the text before the first as ``""``."""
    parts = re.split(r"^=+ (.*?) =+$", output, flags=re.M)
    return [("", parts[0])] + [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def failure_report(returncode: int, stdout: str, stderr: str, limit: int = REPORT_CHARS) -> str:
    """What an assertion shows of a failed pytest subprocess: its first failure (the first block of its
    FAILURES or ERRORS section: the first traceback), its summary, and its stderr; each
    clipped (:func:`clip`), the first failure given the most room. Output that holds no such section
    (a crash, a usage error) is shown as its head and tail."""
    report = [f"the interpreter's pytest run exited with code {returncode}"]
    sections = _sections(stdout)
    failures = [(name, body) for name, body in sections if name in ("FAILURES", "ERRORS")]
    summary = "".join(f"=== {name} ===\n{body}" for name, body in sections
                      if name == "short test summary info" or re.search(r"\b(passed|failed|error|errors|skipped)\b"
                                                                         r".* in [\d.]+s", name))
    if failures:
        name, body = failures[0]
        blocks = re.split(r"^(_{3,} .+? _{3,})$", body, flags=re.M)
        count = (len(blocks) - 1) // 2
        first = blocks[1] + blocks[2] if count else body
        report.append(f"--- the first of {count} in {name} ---\n" + clip(first.strip("\n"), limit // 2))
    else:
        report.append("--- stdout ---\n" + clip(stdout.strip("\n"), limit // 2))
    if summary:
        report.append("--- summary ---\n" + clip(summary.strip("\n"), limit // 4))
    if stderr.strip():
        report.append("--- stderr ---\n" + clip(stderr.strip("\n"), limit // 4))
    return "\n".join(report)


def run_in_interpreter(test_file: str, interpreted: bool) -> None:
    """Runs ``test_file`` in a subprocess with ``TRITON_INTERPRET=1``; fails with its first failure and
    its summary (:func:`failure_report`) if any test there fails."""
    if interpreted:
        pytest.skip("this process interprets the kernels already")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short",
                             os.path.abspath(test_file)],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    ok = result.returncode == 0 and " passed" in result.stdout and " failed" not in result.stdout
    assert ok, failure_report(result.returncode, result.stdout, result.stderr)
