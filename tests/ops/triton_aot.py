"""Ahead-of-time compilation of Triton kernels for a CUDA architecture, without a GPU: Triton lowers
a kernel to PTX and its bundled ``ptxas`` assembles the cubin. What a GPU would otherwise tell at
launch (``OutOfResources``) or only show in a profile (spills) is read from the result:

- shared memory: ``metadata.shared`` (bytes per program, Triton's own figure, checked at launch);
- registers and the stack frame per thread: ``cuobjdump -res-usage`` of the cubin (``REG``,
  ``STACK``); the stack frame holds the register spills, so it bounds them from above;
- tensor cores: an ``mma`` (sm_80) or ``wgmma`` (sm_90) instruction in the PTX.

Compiled kernels come from Triton's own cache (``~/.triton/cache``, or ``TRITON_CACHE_DIR``): a
kernel whose source and options did not change is not compiled again, only its cubin read.
"""
import functools
import os
import re
import subprocess
import tempfile
from typing import Dict, NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

#: Shared memory a program may use, bytes: the opt-in maximum per block of each architecture
#: (sm_90: 227 KB, sm_80: 163 KB; CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
#: Stack frame (register spills) per thread that a launched configuration may need, bytes (issue 17).
SPILL_LIMIT = 512

_NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def available() -> bool:
    """Whether Triton's NVIDIA backend tools (``ptxas``, ``cuobjdump``) are installed."""
    return all(os.path.exists(os.path.join(_NVIDIA_BIN, tool)) for tool in ("ptxas", "cuobjdump"))


class Resources(NamedTuple):
    shared: int  # bytes per program
    registers: int  # per thread
    stack: int  # bytes per thread: the spills (and any local arrays)
    tensor_cores: bool  # an mma / wgmma instruction in the PTX

    def __str__(self):
        return (f"shared {self.shared / 1024:.0f} KB, {self.registers} registers, stack {self.stack} B"
                f"{', tensor cores' if self.tensor_cores else ''}")


def _cubin_usage(cubin: bytes) -> Dict[str, int]:
    """``REG``, ``STACK``, ... of the (one) kernel in ``cubin``, by ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(_NVIDIA_BIN, "cuobjdump"), "-res-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}


@functools.lru_cache(maxsize=None)
def _compile(kernel, signature: tuple, constexprs: tuple, num_warps: int, num_stages: int, arch: int):
    source = ASTSource(fn=kernel, signature=dict(signature), constexprs=dict(constexprs))
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(kernel, signature: Dict[str, str], constexprs: Dict, num_warps: int, num_stages: int,
              arch: int) -> Resources:
    """Compile ``kernel`` (a ``triton.jit`` function) for ``sm_{arch}`` and read its resources.
    ``signature`` maps every non-constexpr argument to its type (``"*fp32"``, ``"i32"``, ...)."""
    full = dict(signature, **{name: "constexpr" for name in constexprs})
    compiled = _compile(kernel, tuple(sorted(full.items())), tuple(sorted(constexprs.items(), key=str)), num_warps,
                        num_stages, arch)
    usage = _cubin_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return Resources(compiled.metadata.shared, usage["REG"], usage["STACK"],
                     bool(re.search(r"^\s*(wgmma|mma)\.", ptx, flags=re.M)))
