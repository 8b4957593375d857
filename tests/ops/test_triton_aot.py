"""Every Triton kernel compiled ahead of time for an H100 (sm_90) and an A100 (sm_80), without a GPU,
at every launch configuration its launch code can choose (listed by that code:
``triton_attention.launch_configs``, ``triton_grid.launch_configs``): shared memory within the
architecture's limit (a launch over it fails with ``OutOfResources``), at most 512 bytes of stack
(register spills) per thread, and tensor cores for the default float32 path (issue 17).

Compiled kernels stay in Triton's cache (``~/.triton/cache``) between runs. Every configuration is
about 400 compiles (10 minutes cold on a busy 2-core machine, 5 seconds warm), too many for a CI
run on a fresh machine, so by default the sweep compiles the heaviest configurations only (the
largest tiles of each kernel, precision and element size: shared memory and registers grow with
the tiles), about 60 compiles; ``CHIMERA_AOT_ALL=1`` compiles every one (last full sweep:
2026-12-06, every configuration within the limits on sm_90 and sm_80).

Measured with Triton 3.9's ptxas (stack per thread, sm_90): the old attention kernels (4 warps,
3 stages, one tile for all of ``S`` and ``P``) needed 252 KB of shared memory and 18 KB of stack at
head_dim 256 (float32), and 1.2-1.6 KB of stack at 64-row tiles and ``P = 32``; now at most 64 KB
of shared memory and 504 bytes of stack, on both architectures.
"""
import math
import os
from typing import Callable, Dict, Hashable, List

import pytest
import torch

pytest.importorskip("triton")

import triton_aot  # noqa: E402

from torch_geometric_chimera.ops import triton_attention as ta  # noqa: E402
from torch_geometric_chimera.ops import triton_grid as tg  # noqa: E402

pytestmark = [
    pytest.mark.skipif(ta.INTERPRETED, reason="the interpreter replaces the JIT functions that triton.compile "
                                              "lowers"),
    pytest.mark.skipif(not triton_aot.available(), reason="Triton's NVIDIA backend (ptxas) is not installed"),
]

ARCHS = (90, 80)
EVERY_CONFIGURATION = os.environ.get("CHIMERA_AOT_ALL", "0") == "1"


def heaviest(configs: List, family: Callable[[object], Hashable], tiles: Callable[[object], Dict[str, int]],
             keep: int = 2) -> List:
    """The ``keep`` configurations of largest tile volume in every family (all with CHIMERA_AOT_ALL=1)."""
    if EVERY_CONFIGURATION:
        return list(configs)
    groups: Dict[Hashable, List] = {}
    for config in configs:
        groups.setdefault(family(config), []).append(config)
    chosen = []
    for members in groups.values():
        members.sort(key=lambda config: math.prod(tiles(config).values()), reverse=True)
        chosen += members[:keep]
    return chosen


def test_the_default_sweep_keeps_the_largest_tiles_of_every_family():
    configs = [dict(kind=kind, BLOCK_A=a, BLOCK_B=b) for kind in "xy" for a in (8, 16, 32) for b in (1, 2)]
    picked = heaviest(configs, lambda c: c["kind"], lambda c: {"a": c["BLOCK_A"], "b": c["BLOCK_B"]})
    if EVERY_CONFIGURATION:
        assert picked == configs
    else:
        assert sorted((c["kind"], c["BLOCK_A"], c["BLOCK_B"]) for c in picked) == [
            ("x", 16, 2), ("x", 32, 2), ("y", 16, 2), ("y", 32, 2)]
ATTENTION_KERNELS = ("_forward_kernel", "_backward_rows_kernel", "_backward_columns_kernel")


def attention_resources(name, meta, arch):
    """Compile one attention kernel at the launch arguments ``meta`` (constexprs, warps, stages)."""
    meta = dict(meta)
    num_warps, num_stages = meta.pop("num_warps", 4), meta.pop("num_stages", 3)  # Triton's defaults
    kernel = getattr(ta, name)
    pointer = "*fp64" if meta["OPERAND"] == ta.tl.float64 else "*fp32"
    signature = {arg: "i32" if arg in ("m", "S", "P") else pointer for arg in kernel.arg_names if arg not in meta}
    return triton_aot.resources(kernel, signature, meta, num_warps, num_stages, arch)


def check(resources, arch, label, failures):
    if resources.shared > triton_aot.SHARED_LIMIT[arch] or resources.stack > triton_aot.SPILL_LIMIT:
        failures.append(f"sm_{arch} {label}: {resources}")


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_at_head_dim_256_fits_shared_memory_and_does_not_spill(arch):
    """The configuration the launch code picks at ``P = 256`` in float32 (``expand * channels / heads``
    of 256): it needed 252 KB of shared memory, over sm_90's 227 KB, and spilled 18 KB per thread."""
    meta = ta._launch_config(128, 16, 256, torch.float32, "float32")
    failures = []
    for name in ("_backward_rows_kernel", "_backward_columns_kernel"):
        check(attention_resources(name, meta, arch), arch, name, failures)
    assert not failures, "\n".join(failures)


def test_every_attention_launch_is_an_enumerated_configuration():
    """``launch_configs`` lists what ``_launch_config`` chooses: sizes around every tile boundary, every
    precision, float32 and float64."""
    listed = ta.launch_configs(ta.INTERPRETED)
    for m in (1, 16, 32, 33, 64, 65, 300):
        for state_dim in (1, 16, 17, 32, 33, 128):
            for head_dim in (1, 32, 33, 64, 65, 256):
                for dtype, precision in ((torch.float64, "float32"), (torch.float32, "float32"),
                                         (torch.float32, "tf32"), (torch.float32, "bf16")):
                    assert ta._launch_config(m, state_dim, head_dim, dtype, precision) in listed


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_kernels_fit_at_every_launch_configuration(arch):
    failures = []
    configs = heaviest(ta.launch_configs(), lambda meta: (meta["INPUT_PRECISION"], str(meta["OPERAND"])),
                       lambda meta: {k: v for k, v in meta.items() if k.startswith("BLOCK")}, keep=1)
    for meta in configs:
        for name in ATTENTION_KERNELS:
            resources = attention_resources(name, meta, arch)
            label = (f"{name} BLOCK_M={meta['BLOCK_M']} BLOCK_S={meta['BLOCK_S']} BLOCK_P={meta['BLOCK_P']} "
                     f"{meta['INPUT_PRECISION']} {meta['OPERAND']}")
            check(resources, arch, label, failures)
            default_float32 = meta["ROUND"] == 0 and meta["OPERAND"] == ta.tl.float32
            if default_float32 and not resources.tensor_cores:
                failures.append(f"sm_{arch} {label}: the default float32 path does not use tensor cores")
    assert not failures, "\n".join(failures)


def test_float32_defaults_to_three_pass_tf32_on_the_tensor_cores():
    # The rule of issue 17 (benchmarks/bench_triton_precision.py): within 2x of float32's error.
    assert ta._launch_config(100, 16, 32, torch.float32, "float32")["INPUT_PRECISION"] == "tf32x3"
    assert ta._launch_config(100, 16, 32, torch.float64, "float32")["INPUT_PRECISION"] == "ieee"


GRID_INT_POINTERS = {"GRAPH_PTR", "ROW_WIDTH", "NODES", "CKPT_PTR"}
GRID_SCALARS = {"num_nodes", "heads", "S", "P", "F", "segment_rows", "P_BLOCKS", "S_BLOCKS"}


@pytest.mark.parametrize("arch", ARCHS)
def test_grid_kernels_fit_at_every_launch_configuration(arch):
    failures = []
    configs = heaviest(tg.launch_configs(), lambda config: config[:2],
                       lambda config: {k: v for k, v in config[2].items() if k.startswith("BLOCK")})
    for name, element_size, meta in configs:
        meta = dict(meta)
        num_warps = meta.pop("num_warps")
        kernel = getattr(tg, name)
        pointer = "*fp64" if element_size == 8 else "*fp32"
        signature = {arg: "i32" if arg in GRID_SCALARS else "*i64" if arg in GRID_INT_POINTERS else pointer
                     for arg in kernel.arg_names if arg not in meta}
        resources = triton_aot.resources(kernel, signature, meta, num_warps, 3, arch)
        check(resources, arch, f"{name} {element_size * 8}-bit {meta}", failures)
    assert not failures, "\n".join(failures)
