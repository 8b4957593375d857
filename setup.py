"""Build torch_geometric_chimera and its C++/CUDA extension against the torch already installed.

Install with ``pip install --no-build-isolation .``: build isolation would make pip fetch a second
copy of torch (several GB with CUDA) into a throwaway build environment.
"""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pragma: no cover - only hit when the install command is wrong
    raise RuntimeError(
        "torch_geometric_chimera compiles against the installed torch: install torch first, "
        "then run `pip install --no-build-isolation .`") from error

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions():
    sources = [os.path.join("csrc", "chimera.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    force_cuda = os.getenv("FORCE_CUDA", "0") == "1"
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and (torch.cuda.is_available() or force_cuda))
    extra = {"cxx": ["-O3"]}
    if os.getenv("CHIMERA_DEBUG_BUILD", "0") == "1":
        extra["cxx"] = ["-O0", "-g"]
    if with_cuda:
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return [CUDAExtension("torch_geometric_chimera._C", sources + cuda_sources, extra_compile_args=extra)]
    return [CppExtension("torch_geometric_chimera._C", sources, extra_compile_args=extra)]


# GraphGym (yacs, PyTorch Lightning) is tested too; none of these pulls another torch.
graphgym_requires = ["yacs", "pytorch_lightning"]
lrgb_requires = ["ogb", "rdkit"]
examples_requires = ["tqdm", "matplotlib"]
test_requires = ["pytest"] + examples_requires + graphgym_requires
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
        "graphgym": graphgym_requires,
        "test": test_requires,
        # Everything that installs from wheels in minutes. Left out: "sparse" (torch_scatter and
        # torch_sparse build from source against the installed torch, about 7 and 14 minutes on 2 cores).
        "full": sorted(set(test_requires + lrgb_requires + triton_requires)),
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
    zip_safe=False,
)
