"""Counting what a piece of code dispatches: aten operations (the op-count targets of the GPU
issue), the kernel launches they would be on a GPU, and the host synchronizations they would cost
there. Counted on CPU tensors: what CUDA would launch or wait for is told by the operation's name."""
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """Counts every aten operation dispatched inside the context, by name (``.ops``)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


#: Operations that launch no kernel on a GPU: allocations without a fill (views are told apart by
#: ``func.is_view``), and the copy of a value to the host (a synchronization, see :class:`CountSyncs`).
NO_LAUNCH = {"aten.empty.memory_format", "aten.empty_like.default", "aten.new_empty.default",
             "aten.empty_strided.default", "aten.new_empty_strided.default", "aten._local_scalar_dense.default"}


class CountLaunches(CountOps):
    """:class:`CountOps` and, in ``.launches``, the operations that would launch a kernel on a GPU:
    all but views and :data:`NO_LAUNCH`."""

    def __init__(self):
        super().__init__()
        self.launches = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and str(func) not in NO_LAUNCH:
            self.launches[str(func)] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


#: Operations that wait for the device on CUDA: a value copied to the host (``item``, ``int``,
#: ``bool``), an output whose size depends on the values, and ``bincount`` (reads its input's range).
SYNCHRONIZING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
                 "aten._unique.default", "aten._unique2.default", "aten.unique_dim.default",
                 "aten.unique_consecutive.default", "aten.bincount.default", "aten.equal.default"}
#: Python methods that copy a tensor to the host without dispatching anything on a CPU tensor.
HOST_COPIES = ("tolist", "numpy", "cpu")


def _synchronizes(func, args, kwargs) -> bool:
    name = str(func)
    if name in SYNCHRONIZING:
        return True
    if name == "aten.repeat_interleave.Tensor":  # the output size is the sum of the counts
        return kwargs.get("output_size") is None
    if name.startswith(("aten.index.", "aten.index_put")):  # a boolean index is a nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    return False


class CountSyncs(TorchDispatchMode):
    """Counts, by name (``.syncs``), everything inside the context that would synchronize with the
    device on CUDA: the operations of :data:`SYNCHRONIZING`, ``repeat_interleave`` without
    ``output_size``, indexing by a boolean mask, and the Python methods :data:`HOST_COPIES`."""

    def __init__(self):
        super().__init__()
        self.syncs = collections.Counter()
        self._saved = {}

    def __enter__(self):
        for name in HOST_COPIES:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.syncs["Tensor." + _name] += 1
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _synchronizes(func, args, kwargs):
            self.syncs[str(func)] += 1
        return func(*args, **kwargs)
