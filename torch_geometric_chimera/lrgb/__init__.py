"""Long Range Graph Benchmark: tasks and their default hyperparameters, data loading and offline
fixtures, the benchmark's own metrics, and the models compared (Chimera-GPS, GPS, GCN)."""
from .data import load_splits, write_fixture
from .metrics import average_precision, macro_f1, mean_absolute_error
from .models import MODELS, LRGBModel, count_parameters, width_for_budget
from .tasks import LRGB_TASKS, TASKS, Task

__all__ = ["TASKS", "LRGB_TASKS", "Task", "load_splits", "write_fixture", "average_precision", "macro_f1",
           "mean_absolute_error", "MODELS", "LRGBModel", "count_parameters", "width_for_budget"]
