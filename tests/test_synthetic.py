"""Synthetic checkpoints: what transformers loads, byte-for-byte determinism, sharding, fine-tunes, vocab growth."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

from mergebot.dev.synthetic import DEFAULT_VOCAB, base_vocabulary, llama_tensor_shapes, make_model
from tests.helpers import load_tensors
from tests.synth_faults import inflate_header_length, make_pickle_model, truncate

REPO = Path(__file__).resolve().parents[1]
EVAL_TEXT = (REPO / "config" / "eval.txt").read_text()


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_transformers_loads_model_and_tokenizer_offline(tmp_path: Path) -> None:
    start = time.perf_counter()
    path = make_model(tmp_path / "m")
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"a default model took {elapsed:.2f}s"  # ~0.03 s in practice; this only catches blow-ups

    model = LlamaForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    config = json.loads((path / "config.json").read_text())
    assert model.dtype == torch.bfloat16
    assert config["vocab_size"] == DEFAULT_VOCAB == len(tokenizer)
    assert set(load_tensors(path)) == set(model.state_dict()) == set(llama_tensor_shapes(config))

    ids = tokenizer(EVAL_TEXT, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id == 1
    assert (ids == tokenizer.unk_token_id).sum().item() == 0  # the vocabulary covers the project's eval text
    with torch.inference_mode():
        out = model(ids[:, :128], labels=ids[:, :128])
    assert torch.isfinite(out.logits).all()
    # Random weights: close to uniform over the vocabulary, so perplexity is finite and near its size.
    assert DEFAULT_VOCAB / 2 < out.loss.exp().item() < DEFAULT_VOCAB * 2
    assert tokenizer.decode(ids[0, 1:4]) == "the garden wakes"


def test_same_arguments_give_byte_identical_files_even_across_processes(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a", seed=7, extra_tokens=["<x>"])
    b = make_model(tmp_path / "b", seed=7, extra_tokens=["<x>"])
    code = "import sys; from pathlib import Path; from mergebot.dev.synthetic import make_model; "
    code += "make_model(Path(sys.argv[1]), seed=7, extra_tokens=['<x>'])"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], check=True, env=env)
    assert digest(a) == digest(b) == digest(tmp_path / "c")
    assert digest(make_model(tmp_path / "d", seed=8))["model.safetensors"] != digest(a)["model.safetensors"]


def test_sharded_output_has_a_consistent_index_and_the_same_values(tmp_path: Path) -> None:
    single = make_model(tmp_path / "single")
    sharded = make_model(tmp_path / "sharded", shard_size=100_000)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    tensors = load_tensors(sharded)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"].values()) == set(files)
    for file in files:
        with safe_open(sharded / file, framework="pt") as f:
            names = set(f.keys())
            assert f.metadata() == {"format": "pt"}
        assert names == {n for n, shard in index["weight_map"].items() if shard == file}
        size = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
        assert size <= 100_000 or len(names) == 1
    reference = load_tensors(single)
    assert tensors.keys() == reference.keys()
    assert all(torch.equal(tensors[n], reference[n]) for n in reference)  # values never depend on sharding
    assert LlamaForCausalLM.from_pretrained(sharded).num_parameters() == sum(t.numel() for t in tensors.values())


def test_tied_embeddings_store_no_lm_head(tmp_path: Path) -> None:
    path = make_model(tmp_path / "tied", tie_embeddings=True, dtype=torch.float16)
    assert "lm_head.weight" not in load_tensors(path)
    model = LlamaForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_fine_tune_is_base_plus_scaled_noise(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base", shard_size=150_000)
    tune = make_model(tmp_path / "tune", base=base, seed=1, noise=0.05)
    same = make_model(tmp_path / "same", base=base, seed=1, noise=0.0, dtype=torch.float32)
    b, t, s = load_tensors(base), load_tensors(tune), load_tensors(same)
    assert b.keys() == t.keys() == s.keys()
    for name, tensor in b.items():
        assert t[name].shape == tensor.shape and t[name].dtype == torch.bfloat16
        rel = (t[name].float() - tensor.float()).norm() / tensor.float().norm()
        assert 0.03 < rel < 0.08, name  # noise is relative to each tensor's RMS, norms (all ones) included
        assert torch.equal(s[name], tensor.float())
    other = load_tensors(make_model(tmp_path / "other", base=base, seed=2, noise=0.05))
    assert not torch.equal(other["model.norm.weight"], t["model.norm.weight"])


def test_extra_tokens_grow_the_vocabulary_and_keep_base_ids(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base")
    wide = make_model(tmp_path / "wide", base=base, seed=1, extra_tokens=["<|im_start|>", "the", "<|im_end|>"])
    config = json.loads((wide / "config.json").read_text())
    assert config["vocab_size"] == DEFAULT_VOCAB + 2  # "the" is already known
    base_tok = AutoTokenizer.from_pretrained(base)
    wide_tok = AutoTokenizer.from_pretrained(wide)
    assert wide_tok.get_vocab() == {**base_tok.get_vocab(), "<|im_start|>": 512, "<|im_end|>": 513}
    assert wide_tok("<|im_start|>the", add_special_tokens=False).input_ids == [512, base_tok.vocab["the"]]
    b, w = load_tensors(base), load_tensors(wide)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert w[name].shape == (DEFAULT_VOCAB + 2, 64)
        assert torch.allclose(w[name][:DEFAULT_VOCAB].float(), b[name].float(), atol=0.01)
        assert w[name][DEFAULT_VOCAB:].float().std() > 0.01  # new rows are initialised, not zero
    assert LlamaForCausalLM.from_pretrained(wide).get_input_embeddings().num_embeddings == DEFAULT_VOCAB + 2
    fresh = make_model(tmp_path / "fresh", extra_tokens=["<think>"])
    assert json.loads((fresh / "config.json").read_text())["vocab_size"] == DEFAULT_VOCAB + 1


def test_base_vocabulary_is_stable_and_covers_the_eval_text() -> None:
    small, large = base_vocabulary(300), base_vocabulary(32000)
    assert large[:300] == small and len(set(large)) == 32000
    assert small[:3] == ["<unk>", "<s>", "</s>"]
    words = set(re.findall(r"\w+|[^\w\s]+", EVAL_TEXT.lower()))
    assert words <= set(base_vocabulary(DEFAULT_VOCAB))


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="heads"):
        make_model(tmp_path / "a", hidden=64, heads=3)
    make_model(tmp_path / "b")
    with pytest.raises(FileExistsError):
        make_model(tmp_path / "b")


def test_fault_helpers_break_files_the_way_they_claim(tmp_path: Path) -> None:
    pickled = make_pickle_model(tmp_path / "pickled", shard_size=100_000)
    assert not list(pickled.glob("*.safetensors")) and not (pickled / "model.safetensors.index.json").exists()
    state = torch.load(pickled / "pytorch_model.bin", weights_only=True)
    assert set(state) == set(load_tensors(make_model(tmp_path / "plain")))
    for name, breaker in (("t", truncate), ("h", inflate_header_length)):
        file = make_model(tmp_path / name) / "model.safetensors"
        breaker(file)
        with pytest.raises(SafetensorError):
            safe_open(file, framework="pt")
