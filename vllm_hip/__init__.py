"""vllm-hip: InfiniteHiP long-context attention for vLLM (``--attention-backend INFINITEHIP``).

Importing this package needs neither a GPU nor vLLM: the vLLM pieces (``vllm_hip.plugin``,
``vllm_hip.backend``) load only when vLLM asks for them.
"""

from vllm_hip.config import ConfigError, InfiniteHipConfig, PruningStage

__version__ = "0.1.0"
__all__ = ["ConfigError", "InfiniteHipConfig", "PruningStage", "infinitehip_attention", "__version__"]


def __getattr__(name: str):
    # The tensor API pulls in torch and the kernels: load it on first use only.
    if name == "infinitehip_attention":
        from vllm_hip.api import infinitehip_attention

        return infinitehip_attention
    raise AttributeError(f"module 'vllm_hip' has no attribute {name!r}")
