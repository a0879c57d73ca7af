"""Shared fixtures: every test runs against a private HF_HOME with Xet and telemetry off."""

import pytest


@pytest.fixture(autouse=True)
def hub_environment(tmp_path_factory, monkeypatch):
    """Keep the real huggingface_hub client away from the user's cache, Xet and the internet."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
