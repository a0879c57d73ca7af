"""Shared fixtures and environment.

huggingface_hub reads its environment once, at import, so the private HF_HOME and the telemetry switches are set
here (Xet stays on, as for users), before any test module imports it; child processes inherit them. The fused loops
compile into the user's own numba cache (as the real model does into theirs), not the session's, so every test
process and merge child after the first on a machine loads them instead of compiling for seconds.
"""

import os
import tempfile
from pathlib import Path

os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mergebot-test-hf-home-")
os.environ.setdefault(
    "NUMBA_CACHE_DIR", str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergebot" / "numba")
)
os.environ["MERGEBOT_CACHE_DIR"] = tempfile.mkdtemp(prefix="mergebot-test-cache-")
os.environ.pop("HF_HUB_DISABLE_XET", None)
os.environ["HF_XET_CLIENT_RETRY_BASE_DELAY"] = "20ms"  # hf_xet waits 3 s, 6 s, 12 s... between retries
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_ENDPOINT", None)

import pytest

from mergebot.dev.devhub import DevHub


@pytest.fixture
def devhub(tmp_path):
    """A local Hub (mergebot.dev.devhub) on a free loopback port, storing its repos under tmp_path/devhub."""
    with DevHub(tmp_path / "devhub").start() as hub:
        yield hub
