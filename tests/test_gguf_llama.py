"""GGUF files read back by llama.cpp itself (llama-cpp-python, the `llama-cpp` extra): tiny checkpoints of each
family give llama.cpp the logits transformers gives from the safetensors (so the tensor layout, the norm
conventions and the hyperparameters are what llama.cpp expects), and llama.cpp tokenizes as transformers does."""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from mergebot.gguf.convert import SUPPORTED_FILE_TYPES, write_gguf
from mergebot.gguf.vocab import SPLITS
from mergebot.pipeline.gguf_check import compare_tensors
from mergebot.pipeline.gguf_llama import ChatIds, read_back
from mergebot.pipeline.perplexity import load_model, measure, token_ids
from mergebot.pipeline.probe import DEFAULT_PROMPTS, probe_ids, read_prompts
from tests.gguf_models import EVAL_TEXT, FAMILIES, build
from tests.helpers import LLAMA_CPP_ABSENT

HARD_TEXT = EVAL_TEXT + " Café, naïve 1234567 and  two  spaces;\n\n\ttab, emoji 🙂 <tool> and 中文."
"""The eval text and what tokenizers disagree on: digits, accents, runs of spaces, tabs, byte fallback."""
llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_ABSENT)
LOGIT_ERROR = {"BF16": 0.15, "Q8_0": 0.5}
"""Largest |llama.cpp − transformers| logit allowed; the logits' spread is about 1 (a wrong layout: several)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-llama")
    return {family: build(family, root / family) for family in FAMILIES}


def _llama(path):
    return llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False)


@pytest.mark.parametrize("file_type", ["BF16", "Q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_computes_what_transformers_computes(models, tmp_path, family, file_type):
    written = write_gguf(models[family], tmp_path / f"tiny-{file_type}.gguf", file_type)
    tokenizer = transformers.AutoTokenizer.from_pretrained(models[family])
    ids = tokenizer(HARD_TEXT, add_special_tokens=False)["input_ids"]
    model = _llama(written.path)
    try:
        assert model.tokenize(HARD_TEXT.encode(), add_bos=False, special=False) == ids
        sequence = [1, *ids[:80]]
        model.eval(sequence)
        theirs = np.asarray(model.scores[: len(sequence)])
    finally:
        model.close()
    reference = transformers.AutoModelForCausalLM.from_pretrained(models[family], dtype=torch.float32)
    with torch.no_grad():
        ours = reference(torch.tensor([sequence])).logits[0].numpy()
    error = float(np.abs(theirs - ours).max())
    print(f"{family} {file_type}: max logit error {error:.4f}, logit spread {ours.std():.3f}")
    assert error < LOGIT_ERROR[file_type]
    if file_type == "BF16":
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.95


def test_read_back_measures_the_merge_perplexity(models, tmp_path):
    written = write_gguf(models["llama"], tmp_path / "tiny-BF16.gguf", "BF16")
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["llama"])
    text_ids = tokenizer(EVAL_TEXT, add_special_tokens=False)["input_ids"]
    ids, _ = token_ids(tokenizer, EVAL_TEXT)
    merge_ppl = measure(load_model(models["llama"]), ids, 64, 8).signature.ppl
    prompts = read_prompts(DEFAULT_PROMPTS)[:2]
    chat = ChatIds(*probe_ids(tokenizer, prompts), turn_end=2)
    back = read_back(written.path, EVAL_TEXT, text_ids, ids, 64, 8, prompts, chat)
    print(f"perplexity: llama.cpp {back.ppl:.4f}, transformers {merge_ppl:.4f}")
    assert back.problem is None and back.first_difference is None and back.template_differs is None
    assert abs(back.ppl / merge_ppl - 1) < 0.01
    assert back.turn_end_stops and len(back.eot_probs) == len(back.stopped) == len(back.answers) == 2


def test_a_file_llama_cpp_cannot_load_is_reported_in_one_line(models, tmp_path):
    written = write_gguf(models["qwen2"], tmp_path / "tiny-BF16.gguf", "BF16")
    with written.path.open("r+b") as handle:
        handle.truncate(written.size // 2)
    back = read_back(written.path, EVAL_TEXT, [], [1, 2, 3], 64, 8, [], None)
    assert back.problem is not None and back.problem.startswith("llama.cpp cannot load it") and "\n" not in back.problem


def test_k_quants_come_from_llama_cpp_quantizer(models, tmp_path):
    assert "Q4_K_M" in SUPPORTED_FILE_TYPES
    written = write_gguf(models["llama"], tmp_path / "tiny-Q4_K_M.gguf", "Q4_K_M")
    reader = gguf.GGUFReader(written.path)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert reader.fields["tokenizer.chat_template"].contents()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-Q4_K_M.gguf"]
    problem, checked, worst = compare_tensors(written, models["llama"])
    print(f"Q4_K_M: {checked} tensors, worst {worst}")
    assert problem is None


@pytest.mark.parametrize("regex", sorted(SPLITS), ids=lambda regex: SPLITS[regex])
def test_llama_cpp_splits_as_the_named_pre_tokenizer(models, tmp_path, regex):
    """Llama 3's and Qwen2's pre-tokenizers, as tokenizer.json writes them, tokenize the hard text the same in
    llama.cpp under the name the GGUF gives them (the tiny vocabulary merges no digits, so the two differ only in
    name here; the real models' digit runs are what tells them apart)."""
    model = Path(shutil.copytree(models["qwen2"], tmp_path / "model"))
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ],
    }
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    written = write_gguf(model, tmp_path / "tiny-BF16.gguf", "BF16")
    ids = transformers.AutoTokenizer.from_pretrained(model)(HARD_TEXT, add_special_tokens=False)["input_ids"]
    loaded = _llama(written.path)
    try:
        assert loaded.tokenize(HARD_TEXT.encode(), add_bos=False, special=False) == ids
    finally:
        loaded.close()


def test_llama_3_rope_scaling_reaches_llama_cpp(models, tmp_path):
    """Llama 3.1's frequency-dependent rotary scaling, written as the rope_freqs tensor: llama.cpp's logits past the
    original context are transformers' (an original context of 16 positions scales most frequencies here)."""
    model = Path(shutil.copytree(models["llama"], tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    (model / "config.json").write_text(json.dumps(config))
    written = write_gguf(model, tmp_path / "tiny-BF16.gguf", "BF16")
    assert "rope_freqs.weight" in {tensor.name for tensor in gguf.GGUFReader(written.path).tensors}
    sequence = [1, *transformers.AutoTokenizer.from_pretrained(model)(EVAL_TEXT, add_special_tokens=False)["input_ids"]]
    sequence = sequence[:120]
    loaded = _llama(written.path)
    try:
        loaded.eval(sequence)
        theirs = np.asarray(loaded.scores[: len(sequence)])
    finally:
        loaded.close()
    reference = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        ours = reference(torch.tensor([sequence])).logits[0].numpy()
    assert float(np.abs(theirs - ours).max()) < LOGIT_ERROR["BF16"]
