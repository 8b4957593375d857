"""Does a built extension carry its own copy of libstdc++?

An extension linked by a compiler that puts libstdc++ in statically (some custom toolchains under
/opt, conda compilers with ``-static-libstdc++`` in their specs) gets a second copy of the
iostream and locale machinery, uninitialized, next to the one torch uses. The first error message
the extension formats (every ``TORCH_CHECK`` that streams a number) then crashes the process with a
segmentation fault (seen with a g++ under /opt) or cuts the message at the first number (seen with
``-static-libstdc++`` and the system g++) instead of raising a clean ``RuntimeError``. The signs, read from the ELF dynamic
section and symbol table (no binutils needed): ``libstdc++.so`` missing from ``NEEDED``, and
definitions of ``std::basic_ostream<char>::_M_insert<...>`` exported by the extension itself.

Used by ``setup.py`` (the build refuses such an extension) and by ``tests/test_build.py``::

    python tools/extension_abi.py torch_geometric_chimera/_C*.so
"""
import struct
import sys
from typing import List, Tuple

# std::basic_ostream<char>::_M_insert<T> and std::ios_base::Init: defined only by libstdc++ itself.
OWN_LIBSTDCXX_PREFIXES = ("_ZNSo9_M_insert", "_ZNSt8ios_base4InitC")

FIX = ("Rebuild it with the system compiler, which links libstdc++.so dynamically, e.g.\n"
       "    CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED=\"/usr/bin/g++ -shared\" LDCXXSHARED=\"/usr/bin/g++ -shared\" "
       "pip install --no-build-isolation .\n"
       "(or the same variables before `python setup.py build_ext --inplace`; setuptools links C++ "
       "extensions with LDCXXSHARED).")

_SHT_DYNAMIC, _SHT_DYNSYM, _DT_NEEDED = 6, 11, 1


def read_dynamic(path: str) -> Tuple[List[str], List[str]]:
    """``(needed, defined)``: the ``DT_NEEDED`` libraries of an ELF64 little-endian shared object
    and the names of the dynamic symbols it defines."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + k * shentsize) for k in range(shnum)]

    def string(table: int, offset: int) -> str:
        start = sections[table][4] + offset
        return data[start:data.index(b"\0", start)].decode("utf-8", "replace")

    needed, defined = [], []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind == _SHT_DYNAMIC:
            for k in range(size // (entsize or 16)):
                tag, value = struct.unpack_from("<qQ", data, offset + k * (entsize or 16))
                if tag == _DT_NEEDED:
                    needed.append(string(link, value))
        elif kind == _SHT_DYNSYM:
            for k in range(size // (entsize or 24)):
                name, _, _, shndx, _, _ = struct.unpack_from("<IBBHQQ", data, offset + k * (entsize or 24))
                if shndx != 0:  # SHN_UNDEF: imported, not defined here
                    defined.append(string(link, name))
    return needed, defined


def own_libstdcxx_problems(path: str) -> List[str]:
    """What shows that ``path`` carries its own libstdc++ (empty when it links it dynamically)."""
    needed, defined = read_dynamic(path)
    problems = []
    if not any(name.startswith("libstdc++.so") for name in needed):
        problems.append(f"libstdc++.so is not among its NEEDED libraries ({', '.join(needed) or 'none'})")
    own = sorted(name for name in defined if name.startswith(OWN_LIBSTDCXX_PREFIXES))
    if own:
        problems.append(f"it defines {len(own)} libstdc++ iostream symbols itself (e.g. {own[0]})")
    return problems


def report(path: str) -> str:
    """A message for the build log, or '' when the extension is fine."""
    problems = own_libstdcxx_problems(path)
    if not problems:
        return ""
    return (f"{path} carries its own copy of libstdc++: " + "; ".join(problems) + ".\n"
            "Every error raised by the extension would then crash the process (a segmentation fault) or lose "
            "its message (cut at the first number) instead of raising a clean RuntimeError. The compiler that linked it puts libstdc++ in statically.\n" + FIX)


if __name__ == "__main__":
    status = 0
    for so in sys.argv[1:]:
        message = report(so)
        print(message or f"{so}: links libstdc++ dynamically (ok)")
        status |= bool(message)
    sys.exit(status)
