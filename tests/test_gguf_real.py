"""The real model's merge (SmolLM2-135M-Instruct's two fine-tunes, linear, in 50 MB shards) as Q8_0 and BF16 GGUF
files: llama.cpp loads them, tokenizes the eval text as the merge does, its perplexity is within the type's
tolerance of the merge's, and with the chat template in the file it answers the probe's prompts and stops; the
figures are printed for the report."""

from pathlib import Path

import pytest

from mergebot.gguf.convert import write_gguf
from mergebot.pipeline.gguf_check import check_gguf, measure_merge, ppl_tolerance
from mergebot.pipeline.perplexity import DEFAULT_MAX_WINDOWS, DEFAULT_WINDOW
from mergebot.pipeline.probe import DEFAULT_PROMPTS, read_prompts
from tests.helpers import LLAMA_CPP_ABSENT, run_cli_process

pytest_plugins = ["tests.realmodel_fixtures"]
pytest.importorskip("llama_cpp", reason=LLAMA_CPP_ABSENT)
EVAL_TEXT = (Path(__file__).parent.parent / "mergebot" / "data" / "eval.txt").read_text()


@pytest.fixture(scope="module")
def merged(real_fine_tunes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf-real") / "merged"
    sources = [f"{model}:0.5" for model in real_fine_tunes.values()]
    result = run_cli_process("merge", "--method", "linear", "--out-shard-size", "50MB", *sources, out)
    assert result.returncode == 0, result.stderr
    return out


def test_llama_cpp_chats_with_the_q8_0_and_bf16_files(merged, tmp_path):
    prompts = read_prompts(DEFAULT_PROMPTS)
    figures = measure_merge(merged, EVAL_TEXT, prompts, DEFAULT_WINDOW, DEFAULT_MAX_WINDOWS)
    assert figures.probe is not None
    for file_type in ("Q8_0", "BF16"):
        written = write_gguf(merged, tmp_path / f"merged-{file_type}.gguf", file_type)
        verdict = check_gguf(written, merged, EVAL_TEXT, merge=figures, prompts=prompts)
        print(
            f"{file_type}: {written.size / 1e6:.1f} MB, perplexity llama.cpp {verdict.perplexity:.3f} vs merge "
            f"{verdict.merge_perplexity:.3f} (tolerance +{ppl_tolerance(file_type):.0%}), end-of-turn probability "
            f"{verdict.eot_prob:.3f} vs {verdict.merge_eot_prob:.3f}, probe stopped {verdict.probe_stopped}/"
            f"{len(prompts)} (merge {verdict.merge_stopped}), worst tensor {verdict.worst_tensor}"
        )
        assert verdict.passed, verdict.reason
        assert verdict.read_by_llama_cpp and verdict.tensors_checked == 272
        assert verdict.probe_stopped >= verdict.merge_stopped / 2
        assert abs(verdict.eot_prob - verdict.merge_eot_prob) < 0.1
