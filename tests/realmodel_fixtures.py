"""Session fixtures for the real model (mergebot.dev.realmodel): built through its cache, so a machine converts the
GGUF and trains the fine-tunes once, and every later session only opens the cached directories.

conftest points MERGEBOT_CACHE_DIR at a fresh temp dir per session, which would rebuild the model every run; these
fixtures use $MERGEBOT_REAL_MODEL_CACHE, else the user's own cache (~/.cache/mergebot, or under $XDG_CACHE_HOME).
The entries are keyed by content and recipe, so sharing them between sessions is safe.
"""

import os
from pathlib import Path

import pytest

from mergebot.dev import broken, realmodel

REAL_CACHE_ENV = "MERGEBOT_REAL_MODEL_CACHE"


def real_cache_root() -> Path:
    """Where the tests keep the real model: one cache per machine, not one per session."""
    configured = os.environ.get(REAL_CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergebot"


@pytest.fixture(scope="session")
def real_base() -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint (bf16)."""
    return realmodel.base_model(real_cache_root())


@pytest.fixture(scope="session")
def real_fine_tunes(real_base: Path) -> dict[str, Path]:
    """Every fine-tune of the base, by name ("code", "licenses")."""
    return {name: realmodel.fine_tune(name, real_cache_root()) for name in sorted(realmodel.FINE_TUNES)}


@pytest.fixture(scope="session")
def real_broken(real_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A broken upload of the base: one middle-layer down_proj scaled by 30."""
    return realmodel.broken_copy(real_base, tmp_path_factory.mktemp("real-broken") / "broken")


@pytest.fixture(scope="session")
def real_broken_uploads(real_fine_tunes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Broken uploads of the "code" fine-tune, one realistic defect each (mergebot.dev.broken), by kind."""
    src, root = real_fine_tunes["code"], tmp_path_factory.mktemp("real-broken-uploads")
    return {
        "foreign template": broken.foreign_template(src, root / "template"),
        "wrong eos id": broken.wrong_eos(src, root / "eos"),
        "re-initialised chat token rows": broken.reinitialised_rows(src, root / "rows"),
        "~10% perplexity damage": broken.scaled_tensor(src, root / "damaged", broken.MILD_FACTOR),
    }
