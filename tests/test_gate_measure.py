"""The gate's measurement on synthetic models: the batched pass against a plain window-by-window loop, the KL
divergence against one computed over the full vocabulary, non-finite logits, and the parents' signature cache."""

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from mergebot.dev.synthetic import make_model
from mergebot.pipeline import perplexity
from mergebot.pipeline.parents import SignatureCache
from mergebot.pipeline.perplexity import (
    TOP_TOKENS,
    Measurement,
    Signature,
    load_model,
    load_tokenizer,
    measure,
    measure_digest,
    token_ids,
)

EVAL = Path(__file__).resolve().parents[1] / "config" / "eval.txt"
SHARP = 30.0
"""lm_head scale that makes a synthetic model's predictions peaked, as a trained model's are (random init ones
are close to uniform over the vocabulary)."""


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and two fine-tunes of it: a near one and a far one."""
    root = tmp_path_factory.mktemp("measure")
    base = make_model(root / "base")
    near = make_model(root / "near", base=base, seed=1)
    return {"base": base, "near": near, "far": make_model(root / "far", base=base, seed=2, noise=0.5)}


@pytest.fixture(scope="module")
def models(paths: dict[str, Path]) -> dict[str, torch.nn.Module]:
    """The models as the gate loads them (tests that change one load their own)."""
    return {name: load_model(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def ids(paths: dict[str, Path]) -> list[int]:
    ids, unknown = token_ids(load_tokenizer(paths["base"]), EVAL.read_text())
    assert len(ids) == 441 and unknown == 0.0  # the windows below are chosen for this length
    return ids


def tiny_signature() -> Signature:
    empty = torch.empty(0, TOP_TOKENS)
    return Signature(7.5, torch.tensor([1, 9]), empty.long(), empty)


def plain_logprobs(
    model: torch.nn.Module, ids: list[int], window: int, max_windows: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per window, one model(input_ids) call of a float32 copy (the gate computes in float32 from the model's own
    weights): log-probabilities at each position, and the next tokens."""
    model = copy.deepcopy(model).float()
    out = []
    with torch.no_grad():
        for start in range(0, min(len(ids), window * max_windows), window):
            chunk = ids[start : start + window]
            if len(chunk) > 1:
                logits = model(input_ids=torch.tensor([chunk])).logits[0, :-1]
                out.append((torch.log_softmax(logits.float(), -1), torch.tensor(chunk[1:])))
    return out


def full_kl(reference: torch.nn.Module, model: torch.nn.Module, ids: list[int]) -> float:
    """Mean KL(reference ‖ model) per position over the whole vocabulary."""
    pairs = zip(plain_logprobs(reference, ids, 128, 32), plain_logprobs(model, ids, 128, 32), strict=True)
    per_position = [(p.double().exp() * (p.double() - q.double())).sum(-1) for (p, _), (q, _) in pairs]
    return float(torch.cat(per_position).mean())


def sharpened(path: Path) -> torch.nn.Module:
    """The model at `path` with its lm_head scaled by SHARP."""
    model = load_model(path)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(SHARP)
    return model


@pytest.mark.parametrize(
    ("window", "max_windows", "logit_elements", "count"),
    [
        (128, 32, 1 << 24, 4),  # 3 full windows and a short trailing one of 57 tokens
        (110, 32, 1 << 24, 4),  # the trailing window would hold one token: it predicts nothing and is dropped
        (64, 3, 1 << 24, 3),  # max_windows stops before the text ends
        (128, 32, 16 * 512, 4),  # the vocabulary projection in steps of 16 positions, across windows
    ],
)
def test_batched_perplexity_equals_a_window_by_window_loop(
    models: dict[str, torch.nn.Module],
    ids: list[int],
    monkeypatch: pytest.MonkeyPatch,
    window: int,
    max_windows: int,
    logit_elements: int,
    count: int,
) -> None:
    monkeypatch.setattr(perplexity, "_LOGIT_ELEMENTS", logit_elements)
    result = measure(models["base"], ids, window, max_windows)
    plain = plain_logprobs(models["base"], ids, window, max_windows)
    assert len(plain) == count
    nll = -sum(float(logp.gather(1, targets[:, None]).double().sum()) for logp, targets in plain)
    positions = sum(len(targets) for _, targets in plain)
    assert result.bad_window is None and result.kl == []
    assert result.signature.ppl == pytest.approx(math.exp(nll / positions), rel=1e-5)
    top = torch.topk(torch.cat([logp for logp, _ in plain]), TOP_TOKENS, dim=-1)
    assert result.signature.top_ids.shape == (positions, TOP_TOKENS)
    torch.testing.assert_close(result.signature.top_logprobs, top.values, rtol=0, atol=1e-4)
    assert torch.equal(result.signature.ids, torch.tensor(ids))


def test_kl_from_its_own_signature_is_zero_and_from_another_model_positive(
    models: dict[str, torch.nn.Module], ids: list[int]
) -> None:
    own = measure(models["base"], ids, 128, 32).signature
    near = measure(models["near"], ids, 128, 32).signature
    result = measure(models["base"], ids, 128, 32, [own, near])
    assert result.signature.ppl == own.ppl
    assert result.kl[0] == pytest.approx(0.0, abs=1e-9)
    assert result.kl[1] > 1e-7


@pytest.mark.parametrize(("sharp", "at_least"), [(False, 0.1), (True, 0.95)])
def test_lumped_kl_is_at_most_the_full_kl_and_close_when_predictions_are_peaked(
    models: dict[str, torch.nn.Module], paths: dict[str, Path], ids: list[int], sharp: bool, at_least: float
) -> None:
    """Top-64 tokens hold most of a peaked distribution, little of a near-uniform one over 512 tokens."""
    reference, model = (sharpened(paths["base"]), sharpened(paths["far"])) if sharp else (models["base"], models["far"])
    signature = measure(reference, ids, 128, 32).signature
    lumped = measure(model, ids, 128, 32, [signature]).kl[0]
    full = full_kl(reference, model, ids)
    assert full > 1e-3
    assert at_least * full <= lumped <= full * (1 + 1e-6)


def test_non_finite_logits_name_the_first_window_they_appear_in(
    models: dict[str, torch.nn.Module], paths: dict[str, Path], ids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN embedding row for a token first seen in window 2 poisons that window's logits only."""
    monkeypatch.setattr(perplexity, "_LOGIT_ELEMENTS", 16 * 512)  # the bad position is past the first step
    token = next(t for t in ids[256:384] if t not in ids[:256])
    reference = measure(models["near"], ids, 128, 32).signature
    poisoned = load_model(paths["near"])
    with torch.no_grad():
        poisoned.get_input_embeddings().weight[token] = math.nan
    result = measure(poisoned, ids, 128, 32, [reference])
    assert isinstance(result, Measurement) and result.bad_window == 2
    assert math.isnan(result.signature.ppl) and math.isnan(result.kl[0])


def test_measure_digest_covers_text_windows_and_kept_tokens() -> None:
    digest = measure_digest("some text", 128, 32)
    assert digest == measure_digest("some text", 128, 32)
    others = {measure_digest("other text", 128, 32), measure_digest("some text", 64, 32)}
    others.add(measure_digest("some text", 128, 16))
    assert len(others | {digest}) == 4


def test_signature_cache_round_trip(models: dict[str, torch.nn.Module], ids: list[int], tmp_path: Path) -> None:
    signature = measure(models["near"], ids, 128, 32).signature
    cache = SignatureCache(tmp_path / "signatures")
    cache.put("org/a", "a1", "m", signature)
    got = cache.get("org/a", "a1", "m")
    assert got is not None and got.ppl == signature.ppl
    for field in ("ids", "top_ids", "top_logprobs"):
        assert torch.equal(getattr(got, field), getattr(signature, field))
    assert cache.get("org/a", "a2", "m") is None and cache.get("org/a", "a1", "other") is None
    assert cache.get("org/b", "a1", "m") is None
    assert len(list((tmp_path / "signatures").iterdir())) == 1  # no temporary file left beside it


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],
        lambda data: data[:5],
        lambda data: b"\xff" * 64,
        lambda data: save({"ppl": torch.tensor(5.0, dtype=torch.float64)}),  # readable, but not a signature
    ],
    ids=["truncated", "shorter-than-a-header", "garbage", "missing-tensors"],
)
def test_an_unreadable_signature_file_counts_as_missing(tmp_path: Path, damage: object) -> None:
    cache = SignatureCache(tmp_path)
    cache.put("org/a", "a1", "m", tiny_signature())
    (file,) = tmp_path.iterdir()
    file.write_bytes(damage(file.read_bytes()))
    assert cache.get("org/a", "a1", "m") is None


def test_a_cache_that_cannot_be_written_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    blocked = SignatureCache(tmp_path / "file" / "signatures")  # its directory cannot be made
    blocked.put("org/a", "a1", "m", tiny_signature())
    assert blocked.get("org/a", "a1", "m") is None
