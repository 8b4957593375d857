"""The built extension links libstdc++ dynamically, and its own errors arrive as RuntimeErrors.

A compiler that links libstdc++ statically into the extension gives it a second, uninitialized copy
of the iostream machinery: every TORCH_CHECK message it formats then kills the process with a
segmentation fault (seen on a GPU image whose default g++ did so). These tests read the built
``.so`` and raise one extension error in a subprocess; tools/check_cuda_build.sh runs them against
the CUDA build too. The last one checks that CI (``.ci/run``) installs what the README installs."""
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import List

import pytest

import torch_geometric_chimera
from torch_geometric_chimera.ops import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = sys.platform.startswith("linux")


def load_extension_abi():
    spec = importlib.util.spec_from_file_location("extension_abi", os.path.join(ROOT, "tools", "extension_abi.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy_libraries(tmp_path_factory):
    """The same C++ (one number streamed into an ostream) linked both ways."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if compiler is None or not LINUX:
        pytest.skip("needs g++ on Linux")
    folder = tmp_path_factory.mktemp("abi")
    source = folder / "toy.cpp"
    source.write_text('#include <sstream>\n#include <string>\nextern "C" int digits(long x) '
                      '{ std::ostringstream o; o << x; return static_cast<int>(o.str().size()); }\n')
    built = {}
    for name, flags in (("dynamic", []), ("static", ["-static-libstdc++"])):
        out = folder / f"toy_{name}.so"
        result = subprocess.run([compiler, "-shared", "-fPIC", "-O1", str(source), "-o", str(out)] + flags,
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"{compiler} cannot link {name}ally: {result.stderr[-300:]}")
        built[name] = str(out)
    return built


@pytest.mark.skipif(not LINUX, reason="ELF shared objects")
def test_built_extension_links_libstdcxx_dynamically():
    so = _extension._C.__file__
    needed, defined = load_extension_abi().read_dynamic(so)
    assert any(name.startswith("libstdc++.so") for name in needed), needed
    # no definition of std::basic_ostream<char>::_M_insert<...> of its own
    assert not [name for name in defined if name.startswith("_ZNSo9_M_insert")]
    assert load_extension_abi().report(so) == ""
    assert not _extension.carries_own_libstdcxx(so)


def test_the_checks_tell_a_static_libstdcxx_from_a_dynamic_one(toy_libraries):
    abi = load_extension_abi()
    assert abi.own_libstdcxx_problems(toy_libraries["dynamic"]) == []
    problems = abi.own_libstdcxx_problems(toy_libraries["static"])
    assert len(problems) == 2 and "NEEDED" in problems[0] and "_M_insert" in problems[1]
    assert "CXX=/usr/bin/g++" in abi.report(toy_libraries["static"])  # the fix is in the message
    # the import-time check (through the dynamic linker) agrees
    assert not _extension.carries_own_libstdcxx(toy_libraries["dynamic"])
    assert _extension.carries_own_libstdcxx(toy_libraries["static"])


def test_setup_refuses_an_extension_with_its_own_libstdcxx(toy_libraries, monkeypatch):
    """setup.py's build_ext runs the check on what it built: a refusal, or a warning when allowed."""
    sys.modules.pop("setup", None)
    monkeypatch.setattr(sys, "argv", ["setup.py", "--name"])  # setup() only prints the name
    monkeypatch.syspath_prepend(ROOT)
    setup_module = importlib.import_module("setup")
    command = setup_module.BuildExtensionChecked.__new__(setup_module.BuildExtensionChecked)
    command.extensions = [type("Ext", (), {"name": "toy"})()]
    command.get_ext_fullpath = lambda name: toy_libraries["static"]
    monkeypatch.setattr(setup_module.BuildExtension, "build_extensions", lambda self: None)
    monkeypatch.delenv("CHIMERA_ALLOW_STATIC_LIBSTDCXX", raising=False)
    with pytest.raises(RuntimeError, match="carries its own copy of libstdc"):
        command.build_extensions()
    monkeypatch.setenv("CHIMERA_ALLOW_STATIC_LIBSTDCXX", "1")
    command.build_extensions()  # a warning only
    command.get_ext_fullpath = lambda name: toy_libraries["dynamic"]
    monkeypatch.delenv("CHIMERA_ALLOW_STATIC_LIBSTDCXX")
    command.build_extensions()


def test_an_extension_error_arrives_as_a_runtime_error():
    """In a fresh process (a crash must not take the test run with it): one TORCH_CHECK of the
    extension that streams numbers into its message."""
    code = ("import torch, torch_geometric_chimera\n"
            "L = lambda v: torch.tensor(v)\n"
            "try:\n"
            "    torch.ops.chimera.spmm(L([0, 1]), L([5]), torch.ones(1, 1), torch.ones(1, 1, 1))\n"
            "except RuntimeError as error:\n"
            "    print('RuntimeError:', str(error).splitlines()[0])\n")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(torch_geometric_chimera.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-1000:]}"
    assert "RuntimeError: chimera::spmm: col[0] = 5 is out of range [0, 1)" in result.stdout


def shell_commands(script: str) -> List[List[str]]:
    """The commands of a shell script or a README code block, each split into words: one per line or
    per ``&&``, comments dropped, and the lines that start with ``if``, ``fi``, ``set`` or ``cd``."""
    commands = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] in ("if", "fi", "set", "cd"):
            continue
        command: List[str] = []
        for word in words + ["&&"]:
            if word != "&&":
                command.append(word)
            elif command:
                commands.append(command)
                command = []
    return commands


def test_ci_installs_what_the_readme_installs_and_runs_its_tests():
    """.ci/run runs the pip commands of the README's quick start (as ``python -m pip install --quiet
    --disable-pip-version-check``, with nothing else pinned, and without the example job), then the
    README's test command: CI tests what a user of the README gets, the newest Triton included."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        quick_start = re.search(r"^## Quick start\n.*?^```bash\n(.*?)^```", f.read(), flags=re.M | re.S)
    assert quick_start, "README.md: no bash block under '## Quick start'"
    readme = shell_commands(quick_start.group(1))
    readme_installs = [c for c in readme if c[:2] == ["pip", "install"]]
    readme_tests = [c for c in readme if "pytest" in c]
    assert readme_installs and readme_tests == [["python", "-m", "pytest", "tests"]], readme

    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = shell_commands(f.read())
    prefix = ["python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    ci_installs = [c for c in ci if "pip" in c]
    assert all(c[:len(prefix)] == prefix for c in ci_installs), ci_installs
    assert [["pip", "install"] + c[len(prefix):] for c in ci_installs] == readme_installs
    assert ci[-1] == readme_tests[0], ci
    assert not [c for c in ci if any(word.startswith("examples/") for word in c)], ci
    assert [c for c in ci if "tools/check_cuda_compiles.sh" in c], ci  # nvcc compiles the CUDA sources
