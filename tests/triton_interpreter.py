"""Running a test file's Triton kernels on the CPU: Triton's interpreter needs ``TRITON_INTERPRET=1``
before Triton is first imported (it decorates its own library functions then), so a test file runs
itself again in a subprocess with the variable set, where its kernel tests run on tiny CPU tensors."""
import os
import subprocess
import sys

import pytest
import torch


def kernel_device(interpreted: bool) -> str:
    """Where the kernels run in this process: CUDA when there is one (and not interpreting), else CPU."""
    return "cuda" if torch.cuda.is_available() and not interpreted else "cpu"


def needs_kernels(interpreted: bool):
    """Marks a test that runs Triton kernels: skipped unless this process interprets them or has CUDA."""
    return pytest.mark.skipif(not (interpreted or kernel_device(interpreted) == "cuda"),
                              reason="the kernels run on CUDA or under TRITON_INTERPRET=1 (the subprocess of "
                                     "test_kernels_in_the_interpreter)")


def run_in_interpreter(test_file: str, interpreted: bool) -> None:
    """Runs ``test_file`` in a subprocess with ``TRITON_INTERPRET=1``; fails with its output if any
    test there fails."""
    if interpreted:
        pytest.skip("this process interprets the kernels already")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(test_file)],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    assert " passed" in result.stdout and " failed" not in result.stdout, output
