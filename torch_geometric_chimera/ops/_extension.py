r"""The compiled extension ``torch_geometric_chimera._C`` (the ``chimera::*`` ops of ``csrc/``):
loading it (:data:`HAS_EXTENSION`), a warning for a build that carries its own libstdc++, and
:func:`transpose_csr`, which the ops' autograd formulas share. Each op's fake kernel, autograd
formula and typed wrapper live with its method: :mod:`.common` (``spmm``, ``edge_dot``),
:mod:`.band` and :mod:`.dag`."""
import warnings
from typing import Tuple

import torch
from torch import Tensor


def carries_own_libstdcxx(path: str) -> bool:
    """Whether the shared object at ``path`` resolves ``std::ostream::operator<<(long)``
    (``_M_insert<long>``) to a copy of libstdc++ linked into itself instead of ``libstdc++.so``.
    Such a build crashes at the first error message it formats (its iostream copy is never
    initialized); ``setup.py`` refuses to build one, this catches one built elsewhere. Linux only."""
    import ctypes
    import os
    import sys

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    if not sys.platform.startswith("linux"):
        return False
    try:
        # dlsym on this handle searches the object first, then its dependencies (libstdc++.so).
        symbol = ctypes.CDLL(path)._ZNSo9_M_insertIlEERSoT_
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return False
    info = DlInfo()
    if not dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return False
    return os.path.realpath(info.dli_fname.decode()) == os.path.realpath(path)


try:
    from .. import _C  # noqa: F401  (importing runs TORCH_LIBRARY registration)
    HAS_EXTENSION = True
    EXTENSION_ERROR = None
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    HAS_EXTENSION = False
    EXTENSION_ERROR = error
    warnings.warn(f"torch_geometric_chimera._C is not built ({error}); falling back to the pure-PyTorch "
                  f"references. Reinstall with `pip install --no-build-isolation .`.")

if HAS_EXTENSION and carries_own_libstdcxx(_C.__file__):  # pragma: no cover - only on a broken toolchain
    warnings.warn(f"{_C.__file__} carries its own copy of libstdc++ (its compiler linked it statically): any "
                  f"error raised by the compiled kernels will crash the process (a segmentation fault) or lose its "
                  f"message instead of raising a clean RuntimeError. Rebuild with the system compiler: CC=/usr/bin/gcc CXX=/usr/bin/g++ "
                  f"LDSHARED=\"/usr/bin/g++ -shared\" LDCXXSHARED=\"/usr/bin/g++ -shared\" pip install "
                  f"--no-build-isolation .", RuntimeWarning)


def transpose_csr(rowptr: Tensor, col: Tensor, num_cols: int) -> Tuple[Tensor, Tensor, Tensor]:
    """CSR of the transpose: ``(rowptr_t, col_t, perm)`` with ``weight_t = weight[perm]``.

    Shapes depend only on the input shapes (``searchsorted`` instead of ``bincount``) so that
    the autograd formulas also trace under fake tensors."""
    num_rows = rowptr.numel() - 1
    row = torch.repeat_interleave(torch.arange(num_rows, device=col.device, dtype=col.dtype), rowptr.diff(),
                                  output_size=col.numel())
    col_sorted, perm = torch.sort(col, stable=True)
    bounds = torch.arange(num_cols + 1, device=col.device, dtype=col.dtype)
    rowptr_t = torch.searchsorted(col_sorted, bounds).to(col.dtype)
    return rowptr_t, row[perm], perm
