"""Shared fixtures and environment.

huggingface_hub reads its environment once, at import, so the private HF_HOME and the Xet/telemetry switches are
set here, before any test module imports it; child processes inherit them.
"""

import os
import tempfile

os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mergebot-test-hf-home-")
os.environ["MERGEBOT_CACHE_DIR"] = tempfile.mkdtemp(prefix="mergebot-test-cache-")
os.environ["HF_HUB_DISABLE_XET"] = "1"
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
