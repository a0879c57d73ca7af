"""A target's GGUF settings: which GGUF files to publish beside its merge, and to which repo.

The type names are llama.cpp's file types as people write them (`Q8_0`, `Q4_K_M`). Some are written by the `gguf`
package alone; the k-quants need llama.cpp's own quantizer (the `llama_cpp` module of llama-cpp-python), so a
config asking for one is refused where that is not installed, before any merge runs.
"""

import importlib.util
import re
from dataclasses import dataclass
from typing import Any

from mergebot.config.document import Located, did_you_mean

WRITTEN_TYPES = ("F16", "BF16", "Q8_0")
"""Written by the `gguf` package's writer and quantizer: no compiler, no llama.cpp."""
QUANTIZER_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
"""Made by llama.cpp's quantizer (llama-cpp-python), never by a copy of it."""
GGUF_KEYS = ("gguf", "gguf_repo")


@dataclass(frozen=True)
class GgufSettings:
    """The GGUF files a target publishes: one per type, into `repo` (the target's own, or a sibling)."""

    types: tuple[str, ...]
    repo: str

    def file_name(self, file_type: str) -> str:
        """`NAME-Q8_0.gguf`, as the community names them (llama.cpp's `-hf REPO:Q8_0` finds a file by that tag)."""
        return f"{self.repo.split('/')[-1].removesuffix('-GGUF')}-{file_type}.gguf"

    @property
    def digest_part(self) -> dict[str, Any]:
        """What goes into the target's config hash: a change of the types or the repo makes the target due."""
        return {"gguf": list(self.types), "gguf_repo": self.repo}


def published_names(repo: str) -> set[str]:
    """Every name mergebot gives a GGUF file in `repo`: the files it replaces or deletes there, and no other."""
    return {GgufSettings((), repo).file_name(file_type) for file_type in (*WRITTEN_TYPES, *QUANTIZER_TYPES)}


def llama_cpp_installed() -> bool:
    """Whether llama-cpp-python is installed, for its quantizer and read-back (found, not imported: importing it
    loads llama.cpp, and the daemon reads configs too)."""
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_settings(
    raw: dict[str, Any], located: Located, prefix: str, repo: str, *, quantizer: bool
) -> GgufSettings | None:
    """The target's `gguf` and `gguf_repo` keys, checked: None when it asks for no GGUF file. `quantizer`: whether
    llama.cpp's quantizer is installed (`llama_cpp_installed`), without which a k-quant is refused."""
    if "gguf" not in raw:
        if "gguf_repo" in raw:
            raise located.error(f"{prefix}gguf_repo", "needs gguf: the GGUF types to publish there")
        return None
    types = raw["gguf"]
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise located.error(f"{prefix}gguf", f"must be a list of GGUF types, e.g. ['Q8_0', 'BF16'] ({_known()})")
    for file_type in types:
        if file_type in QUANTIZER_TYPES and not quantizer:
            why = "needs llama.cpp's quantizer: pip install -c constraints.txt -e '.[llama-cpp]' (llama-cpp-python)"
            raise located.error(f"{prefix}gguf", f"{file_type} {why}", value=file_type)
        if file_type not in (*WRITTEN_TYPES, *QUANTIZER_TYPES):
            hint = did_you_mean(file_type, (*WRITTEN_TYPES, *QUANTIZER_TYPES)) or did_you_mean(
                file_type.upper(), (*WRITTEN_TYPES, *QUANTIZER_TYPES)
            )
            raise located.error(f"{prefix}gguf", f"{file_type!r} is not a GGUF type ({_known()}){hint}", file_type)
    if len(set(types)) != len(types):
        raise located.error(f"{prefix}gguf", "names a type twice")
    gguf_repo = raw.get("gguf_repo", repo)
    if not isinstance(gguf_repo, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", gguf_repo):
        raise located.error(f"{prefix}gguf_repo", "must be a Hub repo as org/name, e.g. the target's repo + '-GGUF'")
    return GgufSettings(tuple(types), gguf_repo)


def _known() -> str:
    return f"known: {', '.join(WRITTEN_TYPES)}; with llama.cpp's quantizer also {', '.join(QUANTIZER_TYPES)}"
