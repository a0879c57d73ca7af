"""The real model (SmolLM2-135M-Instruct and a real fine-tune) through the real daemon on the local Hub, with GGUF
files: the merge and its Q8_0 and BF16 files are published in one commit, and llama.cpp loads the published Q8_0
file, answers the chat prompt and stops. The GGUF files' perplexity beside the merge's is printed for the report
(`pytest -s`)."""

from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download

from mergebot.runrecord import Outcome
from tests.helpers import LLAMA_CPP_ABSENT
from tests.test_daemon import TOKEN, Setup
from tests.test_daemon_gguf import files_at, finished

pytest_plugins = ["tests.realmodel_fixtures"]
pytest.importorskip("llama_cpp", reason=LLAMA_CPP_ABSENT)

QUESTION = "What is the capital of France?"
REAL_TIMEOUT = 1200.0
"""Merge, gate, then two GGUF files converted and each checked by transformers' loader and llama.cpp, on a loaded
two-core machine."""


@pytest.fixture
def setup(devhub, tmp_path, real_base, real_fine_tunes):
    created = Setup(devhub, tmp_path)
    for repo, folder in (("org/real-base", real_base), ("org/real-code", real_fine_tunes["code"])):
        created.api.create_repo(repo, exist_ok=True)
        created.api.upload_folder(repo_id=repo, folder_path=folder, commit_message="upload")
    yield created
    if created.process and created.process.poll() is None:
        created.process.kill()
        created.process.wait()


REAL_TARGET = """
[[targets]]
name = "real"
repo = "me/real"
merge_method = "slerp"
base_model = "org/real-base"
models = [{ model = "org/real-base" }, { model = "org/real-code" }]
parameters = { t = 0.5 }
gguf = ["Q8_0", "BF16"]
"""


def test_the_daemon_publishes_the_real_merge_with_gguf_files_that_llama_cpp_chats_with(setup):
    from llama_cpp import Llama

    setup.write_config(REAL_TARGET, poll="1h")
    setup.start()
    (run,) = finished(setup, "real", 1, timeout=REAL_TIMEOUT)
    assert run.outcome == Outcome.PUBLISHED, run.reason
    gguf = run.record.gguf
    merge_ppl = run.record.figures["merge_ppl"]
    print(f"\nmerge perplexity {merge_ppl:.4f}")
    for file_type, result in gguf.items():
        print(f"{file_type}: {result['size'] / 1e6:.1f} MB, perplexity {result['perplexity']:.4f} "
              f"({result['perplexity'] / merge_ppl - 1:+.2%}), stop rate {result['stop_rate']}")  # fmt: skip
        assert result["passed"] and result["published"], result
    assert {"real-Q8_0.gguf", "real-BF16.gguf", "model.safetensors.index.json"} <= files_at(
        setup, "me/real", run.published_sha
    ), "in the merge's own commit"
    path = hf_hub_download(
        "me/real", "real-Q8_0.gguf", revision=run.published_sha, endpoint=setup.devhub.url, token=TOKEN,
        cache_dir=setup.root / "dl",
    )  # fmt: skip
    llama = Llama(model_path=str(Path(path)), n_ctx=512, n_threads=2, seed=0, verbose=False)
    answer = llama.create_chat_completion(
        messages=[{"role": "user", "content": QUESTION}], max_tokens=64, temperature=0.0
    )["choices"][0]
    print(f"llama.cpp, Q8_0: {answer['message']['content']!r} ({answer['finish_reason']})")
    assert answer["finish_reason"] == "stop", "it ends its turn with the chat template's end-of-turn token"
    assert "paris" in answer["message"]["content"].lower()
    assert setup.stop() == 0
