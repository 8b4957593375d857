"""Pieces shared by the examples (run as scripts: each puts this folder on ``sys.path``)."""
import math
import os
import platform
from typing import Callable, List

import torch
from torch import Tensor, nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def warmup_cosine(optimizer, warmup: int, total: int):
    """Linear warmup over ``warmup`` scheduler steps, then cosine decay to 0 at ``total``."""
    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def machine_description(device: torch.device) -> str:
    """CPU (or GPU) model, cores, torch version and threads, for the log and the printed table."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
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
