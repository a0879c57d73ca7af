"""Shared fixtures and environment.

huggingface_hub reads its environment once, at import, so the private HF_HOME and the telemetry switches are set
here (Xet stays on, as for users), before any test module imports it; child processes inherit them. The fused loops
compile into the user's own numba cache (as the real model does into theirs), not the session's, so every test
process and merge child after the first on a machine loads them instead of compiling for seconds.
"""

import os
import shutil
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

HF_HOME = Path(os.environ["HF_HOME"])
MERGEBOT_CACHE = Path(os.environ["MERGEBOT_CACHE_DIR"])

TIERS = {
    "slow": {
        "test_realmodel", "test_real_gate", "test_real_merges", "test_demo", "test_gguf_real", "test_gguf_daemon_real",
        "test_real_moe",
    },
    "external": {
        "test_mergekit_existing", "test_mergekit_geometric", "test_mergekit_sparse", "test_mergekit_examples",
        "test_mirror", "test_ray", "test_gguf_llama", "test_gguf_real", "test_gguf_daemon_real",
    },
    "process": {
        "test_daemon", "test_daemon_runs", "test_daemon_stages", "test_deploy", "test_disk_full", "test_status_page",
        "test_daemon_gguf",
    },
}  # fmt: skip
"""Each test's tier (markers registered in pyproject.toml), by its module: `slow` runs the real model (or takes
tens of seconds), `external` needs what lives outside the project (mergekit's reference install, an olah mirror, a
Ray cluster, chromium, llama.cpp), `process` runs the real daemon or the CLI as a process. A test elsewhere that
starts the daemon (the `setup` fixture) or reads mergekit's merges (`mergekit`, `kit`) goes with them, and so do the
tests below.
What is left is the fast tier: `pytest -m "not slow and not process and not external"`."""
BY_FIXTURE = {"setup": "process", "mergekit": "external", "kit": "external"}
BY_TEST = {
    "slow": (
        "test_publish.py::test_interrupted_upload_leaves_previous_revision",
        "test_kernels.py::test_fused_loops_give_the_torch_methods_bytes[random-",
        "test_kernels.py::test_fused_loops_in_float32_and_with_other_settings",
        "test_gate_measure.py::test_lumped_kl_is_at_most_the_full_kl",
    ),
    "process": (
        "test_kernels.py::test_engine_output_is_the_same_with_one_thread_or_two",
        "test_merge_engine.py::test_kill_at_any_moment_then_resume_is_byte_identical",
        "test_merge_errors.py::test_exit_code_and_single_line_from_the_real_command",
        "test_config.py::test_a_method_without_fused_loops_loads_torch",
        "test_config.py::test_a_fused_merge_loads_neither",
        "test_synthetic.py::test_same_arguments_give_byte_identical_files_even_across_processes",
    ),
    "external": (
        "test_stages.py::test_the_same_multi_stage_merge_as_mergekit_multimerge",
        "test_lora.py::test_the_same_lora_merge_as_mergekit",
        "test_status_page.py::test_chromium_renders_the_table",
    ),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tiers, then put the modules holding slow tests first: the two workers (pyproject's
    `-n 2 --dist loadfile`) start on the long modules, and the short ones fill in around them."""
    slow_modules = set()
    for item in items:
        module, test = item.path.stem, item.nodeid.rpartition("/")[2]
        tiers = {tier for tier, modules in TIERS.items() if module in modules}
        tiers |= {BY_FIXTURE[name] for name in getattr(item, "fixturenames", ()) if name in BY_FIXTURE}
        tiers |= {tier for tier, prefixes in BY_TEST.items() if test.startswith(prefixes)}
        for tier in sorted(tiers):
            item.add_marker(tier)
        if tiers & {"slow", "process"}:
            slow_modules.add(item.path)
    items.sort(key=lambda item: item.path not in slow_modules)


def pytest_sessionfinish() -> None:
    shutil.rmtree(HF_HOME, ignore_errors=True)
    shutil.rmtree(MERGEBOT_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def forget_xet_shards():
    """hf_xet keeps a shard cache per Hub address, and a later test's local Hub may get the same port: the client
    would then dedupe against xorbs that Hub never received, and its shard upload fail (400 on /v1/shards)."""
    yield
    shutil.rmtree(HF_HOME / "xet", ignore_errors=True)


@pytest.fixture
def devhub(tmp_path):
    """A local Hub (mergebot.dev.devhub) on a free loopback port, storing its repos under tmp_path/devhub."""
    with DevHub(tmp_path / "devhub").start() as hub:
        yield hub
