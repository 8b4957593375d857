"""Build torch_geometric_chimera and its C++/CUDA extension against the torch already installed.

Install with ``pip install --no-build-isolation .``: build isolation would make pip fetch a second
copy of torch (several GB with CUDA) into a throwaway build environment.

Build variables:
    CC, CXX, LDSHARED, LDCXXSHARED  the compilers and the link commands (setuptools'; C++
                       extensions link with LDCXXSHARED). The link must use libstdc++.so dynamically,
                       like torch: the build refuses an extension that carries its own libstdc++
                       (tools/extension_abi.py). Where the default compiler links it statically:
                       CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
                       LDCXXSHARED="/usr/bin/g++ -shared".
    FORCE_CUDA=1       build the CUDA kernels without a visible GPU (needs a CUDA build of torch and nvcc);
    TORCH_CUDA_ARCH_LIST  the GPU architectures to compile for, e.g. "9.0".
    CHIMERA_DEBUG_BUILD=1  -O0 -g.
    CHIMERA_ALLOW_STATIC_LIBSTDCXX=1  keep (with a warning) an extension with its own libstdc++.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pragma: no cover - only hit when the install command is wrong
    raise RuntimeError(
        "torch_geometric_chimera compiles against the installed torch: install torch first, "
        "then run `pip install --no-build-isolation .`") from error

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_extension_abi():
    import importlib.util
    spec = importlib.util.spec_from_file_location("extension_abi", os.path.join(ROOT, "tools", "extension_abi.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildExtensionChecked(BuildExtension.with_options(use_ninja=False)):
    """Refuses an extension that carries its own copy of libstdc++ (see tools/extension_abi.py):
    its first error message would crash the process. CHIMERA_ALLOW_STATIC_LIBSTDCXX=1 turns the
    refusal into a warning."""

    def build_extensions(self):
        super().build_extensions()
        if not sys.platform.startswith("linux"):
            return
        abi = _load_extension_abi()
        for ext in self.extensions:
            message = abi.report(self.get_ext_fullpath(ext.name))
            if not message:
                continue
            if os.getenv("CHIMERA_ALLOW_STATIC_LIBSTDCXX", "0") == "1":
                print(f"WARNING: {message}", file=sys.stderr)
            else:
                raise RuntimeError(message + "\nSet CHIMERA_ALLOW_STATIC_LIBSTDCXX=1 to keep it anyway.")


def extensions():
    sources = [os.path.join("csrc", "chimera.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    force_cuda = os.getenv("FORCE_CUDA", "0") == "1"
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and (torch.cuda.is_available() or force_cuda))
    extra = {"cxx": ["-O3", "-fopenmp-simd"]}  # OpenMP simd pragmas: vector reductions
    if os.getenv("CHIMERA_DEBUG_BUILD", "0") == "1":
        extra["cxx"] = ["-O0", "-g"]
    link = []
    if openmp_backend():
        # at::parallel_for is a header template: with ATen's OpenMP backend it runs its loop under
        # `#pragma omp parallel`, which only a translation unit compiled with -fopenmp honours.
        # Without it every kernel of this extension ran on one thread.
        extra["cxx"] += ["-fopenmp"]
        link = ["-fopenmp"]
    if with_cuda:
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return [CUDAExtension("torch_geometric_chimera._C", sources + cuda_sources, extra_compile_args=extra,
                              extra_link_args=link)]
    return [CppExtension("torch_geometric_chimera._C", sources, extra_compile_args=extra, extra_link_args=link)]


def openmp_backend() -> bool:
    """Whether ATen parallelizes with OpenMP (the Linux wheels do) and the compiler has it."""
    if sys.platform == "win32" or os.getenv("CHIMERA_NO_OPENMP", "0") == "1":
        return False
    info = torch.__config__.parallel_info()
    return "ATen parallel backend: OpenMP" in info and "OpenMP not found" not in info


# GraphGym (yacs, PyTorch Lightning) is tested too; none of these pulls another torch.
graphgym_requires = ["yacs", "pytorch_lightning"]
lrgb_requires = ["ogb", "rdkit"]
examples_requires = ["tqdm", "matplotlib"]
# examples/images.py trains on scikit-learn's digits (shipped with the package, no download).
images_requires = ["scikit-learn"]
# What GraphGPS's own main.py imports beyond torch and PyG (graphgym.graphgps_main runs it).
graphgps_requires = ["ogb", "performer-pytorch", "scikit-learn", "pandas", "tensorboardX"] + graphgym_requires
test_requires = ["pytest"] + examples_requires + graphgym_requires + images_requires
# Triton ships wheels for Linux only (about 290 MB; it does not depend on torch).
triton_requires = ['triton; platform_system == "Linux"']
setup(
    name="torch_geometric_chimera",
    version="0.1.0",
    description="Chimera: selective state space models on graphs through the resolvent of a learned adjacency",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["torch_geometric_chimera", "torch_geometric_chimera.*"]),
    package_data={"torch_geometric_chimera": ["datasets/data/*.pt"]},
    # Only names, no version ranges: an installed torch must satisfy this without a download.
    install_requires=["torch", "torch_geometric"],
    extras_require={
        "sparse": ["torch_scatter", "torch_sparse"],
        "triton": triton_requires,
        "lrgb": lrgb_requires,
        "examples": examples_requires,
        "images": images_requires,
        "graphgps": graphgps_requires,
        "graphgym": graphgym_requires,
        "test": test_requires,
        # Everything that installs from wheels in minutes. Left out: "sparse" (torch_scatter and
        # torch_sparse build from source against the installed torch, about 7 and 14 minutes on 2 cores).
        "full": sorted(set(test_requires + lrgb_requires + triton_requires + images_requires + graphgps_requires)),
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtensionChecked},
    zip_safe=False,
)
