"""transformers reading a GGUF file, as mergebot does twice (the real model comes from one; every GGUF file it
writes is read back by one): quietly, and its header parsed once rather than three times."""

import contextlib
import functools
import os
from collections.abc import Iterator


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """One line in a log, not dozens of bar redraws: transformers' bars are switched off, and so is its GGUF
    loader's own bar, which ignores that switch."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled, bar = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """transformers parses the GGUF header three times (config, tokenizer, weights) and rebuilds gguf's tensor-name
    map for every submodule, about 10 s each on two cores; remember both while one file is read."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def reader(path: str | os.PathLike[str], mode: str = "r") -> object:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
