"""The k-quant GGUF types (Q4_K_M and friends), made by llama.cpp's own quantizer from a BF16 GGUF this package
wrote: their block formats and per-tensor mix are llama.cpp's, and are never re-implemented here. Offered only when
llama-cpp-python is installed (the `llama-cpp` extra)."""

import logging
from pathlib import Path

from mergebot.errors import GgufError


def quantize(source: Path, out_path: Path, file_type: str) -> None:
    """Write `out_path` as `file_type` from the F16/BF16 GGUF `source`, with llama.cpp's quantizer."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    # llama.cpp logs a line per tensor (its warnings reach llama-cpp-python as errors); failure is the status
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out_path).encode(), params)
    finally:
        logger.setLevel(level)
    if status != 0:
        raise GgufError(f"{out_path}: llama.cpp's quantizer failed making {file_type} (status {status})")
