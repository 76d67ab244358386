"""InfiniteHiP's Triton kernels (launchers, ``@triton.jit`` kernels, PyTorch references).

The folder is ``triton_kernels/`` but the package installs as ``vllm_hip_kernels``: vLLM imports
a top-level ``triton_kernels`` as the OpenAI kernel library it bundles
(``vllm.third_party.triton_kernels``, its MXFP4 MoE path), and ours must not stand in for it.
Where Python still finds this folder by its name (a process started in the repository root), the
name is handed over to vLLM's bundled package, which is what any importer of it means.
"""

if __name__ == "triton_kernels":  # imported by folder name, not as vllm_hip_kernels
    import sys

    try:
        import vllm.third_party.triton_kernels as _bundled
    except ImportError:  # no vLLM here: nobody else wants the name
        pass
    else:
        sys.modules[__name__] = _bundled
