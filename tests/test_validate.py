"""The validation gate on synthetic models: a clean merge passes; every kind of broken one fails, naming why."""

import json
import math
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from mergebot.config.daemon import ValidateSettings
from mergebot.daemon.perplexity_cache import StatePerplexityCache
from mergebot.daemon.state import State
from mergebot.dev.synthetic import make_model
from mergebot.errors import ConfigError, ModelError, ValidationFailed
from mergebot.files import local_identity
from mergebot.merge.io import read_header
from mergebot.pipeline import perplexity as perplexity_module
from mergebot.pipeline.gate import ValidationReport, validate
from mergebot.pipeline.perplexity import (
    PPL_CACHE_FILE,
    JsonPerplexityCache,
    Parent,
    PerplexityCache,
    perplexity_measure,
)
from mergebot.pipeline.report import format_report
from tests.synth_faults import (
    add_tensor,
    drop_from_index,
    inflate_header_length,
    make_pickle_model,
    set_value,
    truncate,
)

EVAL = Path(__file__).resolve().parents[1] / "config" / "eval.txt"
DEFAULT_MAX_PPL_RATIO = ValidateSettings.max_ppl_ratio
ALL_CHECKS = [
    "config",
    "weight files",
    "tensors",
    "tokenizer",
    "load",
    "finite weights",
    "finite logits",
    "perplexity",
]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two parents fine-tuned from one base, and a sharded stand-in for their merge."""
    root = tmp_path_factory.mktemp("family")
    base = make_model(root / "base")
    return {
        "a": make_model(root / "a", base=base, seed=1),
        "b": make_model(root / "b", base=base, seed=2),
        "merge": make_model(root / "merge", base=base, seed=3, shard_size=100_000),
    }


@pytest.fixture
def merge(family: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the merge that a test may break."""
    return Path(shutil.copytree(family["merge"], tmp_path / "merge"))


@pytest.fixture(params=["json", "state"])
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PerplexityCache]:
    """Both parent-perplexity caches: the CLI's JSON file and the daemon's state database."""
    if request.param == "json":
        yield JsonPerplexityCache(tmp_path / "cache")
    else:
        with State.open(tmp_path / "state") as state:
            yield StatePerplexityCache(state)


def parent(path: Path) -> Parent:
    return Parent(path, local_identity(path))


def run(
    out: Path, family: dict[str, Path], tmp_path: Path, revision_a: str | None = None, **kwargs: object
) -> ValidationReport:
    parents = {"org/a": parent(family["a"]), "org/b": parent(family["b"])}
    if revision_a:
        parents["org/a"] = Parent(family["a"], revision_a)
    kwargs.setdefault("cache", JsonPerplexityCache(tmp_path / "cache"))
    return validate(out, eval_text_path=EVAL, parents=parents, **kwargs)


def failed(report: ValidationReport) -> dict[str, str]:
    return {c.name: c.detail for c in report.failed_checks}


def test_clean_merge_passes_with_numbers(family: dict[str, Path], tmp_path: Path) -> None:
    report = run(family["merge"], family, tmp_path)
    assert report.passed, format_report(report)
    assert [c.name for c in report.checks] == ALL_CHECKS
    assert [p.name for p in report.parents] == ["org/a", "org/b"]
    worst = max(p.ppl for p in report.parents)
    assert report.worst_parent_ppl == worst and report.limit == pytest.approx(DEFAULT_MAX_PPL_RATIO * worst)
    assert report.ratio == pytest.approx(report.merge_ppl / worst) and 0.9 < report.ratio < 1.1
    assert report.eval_tokens > 400 and report.windows == 4 and report.peak_rss_mb > 50
    report.raise_if_failed()
    text = format_report(report)
    assert "PASSED" in text and "org/b" in text and f"{report.merge_ppl:.3f}" in text and "peak RSS" in text


def test_parent_perplexity_is_computed_once_per_revision(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: PerplexityCache
) -> None:
    first = run(family["merge"], family, tmp_path, cache=cache)
    assert [p.cached for p in first.parents] == [False, False]

    def must_not_run(*args: object) -> float:
        raise AssertionError("parent perplexity recomputed despite the cache")

    monkeypatch.setattr(perplexity_module, "parent_perplexity", must_not_run)
    second = run(family["merge"], family, tmp_path, cache=cache)
    assert [p.cached for p in second.parents] == [True, True]
    assert [p.ppl for p in second.parents] == [p.ppl for p in first.parents]
    monkeypatch.undo()
    # Measured differently (window) or at another revision: not the same entry.
    assert not any(p.cached for p in run(family["merge"], family, tmp_path, cache=cache, window=64).parents)
    other = run(family["merge"], family, tmp_path, cache=cache, revision_a="f" * 40)
    assert [p.cached for p in other.parents] == [False, True]


def test_perplexity_measure_covers_text_and_windows() -> None:
    measure = perplexity_measure("some text", 128, 32)
    assert measure == perplexity_measure("some text", 128, 32)
    others = {perplexity_measure("other text", 128, 32), perplexity_measure("some text", 64, 32)}
    others.add(perplexity_measure("some text", 128, 16))
    assert len(others | {measure}) == 4


def test_a_broken_cache_only_costs_a_recomputation(tmp_path: Path) -> None:
    json_cache = JsonPerplexityCache(tmp_path / "cache")
    json_cache.put("org/a", "a1", "m", 7.5)
    assert json_cache.get("org/a", "a1", "m") == 7.5 and json_cache.get("org/a", "a1", "other") is None
    (tmp_path / "cache" / PPL_CACHE_FILE).write_text("{not json")
    assert json_cache.get("org/a", "a1", "m") is None
    (tmp_path / "file").write_text("")
    JsonPerplexityCache(tmp_path / "file" / "cache").put("org/a", "a1", "m", 7.5)  # no directory: nothing kept
    (tmp_path / "blocked" / PPL_CACHE_FILE).mkdir(parents=True)  # the rename onto it fails
    JsonPerplexityCache(tmp_path / "blocked").put("org/a", "a1", "m", 7.5)
    assert list((tmp_path / "blocked").iterdir()) == [tmp_path / "blocked" / PPL_CACHE_FILE]  # no temp file left

    state = State.open(tmp_path / "state")
    state_cache = StatePerplexityCache(state)
    state_cache.put("org/a", "a1", "m", 7.5)
    assert state_cache.get("org/a", "a1", "m") == 7.5 and state.parent_perplexity("org/a", "a1", "m") == 7.5
    state.close()
    assert state_cache.get("org/a", "a1", "m") is None  # a database error is logged, not raised
    state_cache.put("org/a", "a1", "m", 8.0)


def test_index_dropping_a_tensor_fails_naming_it(merge: Path, family: dict[str, Path], tmp_path: Path) -> None:
    drop_from_index(merge, "model.layers.1.mlp.down_proj.weight")
    report = run(merge, family, tmp_path)
    assert not report.passed and report.merge_ppl is None
    assert list(failed(report)) == ["tensors"]
    assert "missing: model.layers.1.mlp.down_proj.weight" in failed(report)["tensors"]
    with pytest.raises(ValidationFailed, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        report.raise_if_failed()


def test_extra_tensor_fails(merge: Path, family: dict[str, Path], tmp_path: Path) -> None:
    add_tensor(merge, "model.layers.0.mlp.extra.weight", torch.zeros(4, dtype=torch.bfloat16))
    assert "extra: model.layers.0.mlp.extra.weight" in failed(run(merge, family, tmp_path))["tensors"]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("intermediate_size", 96, "wrong shape: model.layers.0.mlp.gate_proj.weight [128, 64]"),
        ("dtype", "float16", "dtype differs from config.json's float16"),
    ],
)
def test_config_disagreeing_with_weights_fails(
    merge: Path, family: dict[str, Path], tmp_path: Path, key: str, value: object, expected: str
) -> None:
    config = json.loads((merge / "config.json").read_text())
    config[key] = value
    config.pop("torch_dtype")
    (merge / "config.json").write_text(json.dumps(config))
    assert expected in failed(run(merge, family, tmp_path))["tensors"]


def test_tied_lm_head_counts_as_present(tmp_path: Path) -> None:
    tied = make_model(tmp_path / "tied", tie_embeddings=True)
    report = validate(tied, eval_text_path=EVAL, parents=None, cache=None)
    assert report.passed, format_report(report)
    assert report.checks[-1].detail.endswith("(no parents to compare with)") and report.limit is None


def test_nan_weight_fails_the_gate(merge: Path, family: dict[str, Path], tmp_path: Path) -> None:
    set_value(merge, "model.layers.2.mlp.up_proj.weight", math.nan)
    report = run(merge, family, tmp_path)
    assert failed(report) == {
        "finite weights": "NaN/inf in model.layers.2.mlp.up_proj.weight",
        "finite logits": "NaN/inf logits in window 0",
    }
    assert math.isnan(report.merge_ppl) and report.parents == []
    assert "FAILED" in format_report(report)


def test_perplexity_far_above_parents_fails(family: dict[str, Path], tmp_path: Path) -> None:
    base = family["a"].parent / "base"
    noisy = make_model(tmp_path / "noisy", base=base, seed=4, noise=3.0)
    report = run(noisy, family, tmp_path)
    assert list(failed(report)) == ["perplexity"]
    assert report.ratio > DEFAULT_MAX_PPL_RATIO and report.merge_ppl > report.limit
    assert run(noisy, family, tmp_path, max_ppl_ratio=report.ratio * 1.01).passed


@pytest.mark.parametrize(("breaker", "message"), [(truncate, "truncated"), (inflate_header_length, "header length")])
def test_corrupt_shard_fails_naming_the_file(
    merge: Path, family: dict[str, Path], tmp_path: Path, breaker: object, message: str
) -> None:
    shard = merge / "model-00002-of-00005.safetensors"
    breaker(shard)
    detail = failed(run(merge, family, tmp_path))["weight files"]
    assert str(shard) in detail and message in detail
    with pytest.raises(ModelError, match=message):
        read_header(shard)


def rewrite_header(file: Path, edit: Callable[[dict], object]) -> None:
    """Replace a safetensors file's header with `edit(header)` (JSON-encoded, or bytes written as they are)."""
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8 : 8 + length]))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def set_first(key: str, value: object) -> Callable[[dict], dict]:
    """An edit setting `key` of the header's first tensor entry."""

    def edit(header: dict) -> dict:
        header[min(k for k in header if k != "__metadata__")][key] = value
        return header

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda header: b"{not json", "not valid JSON"),
        (lambda header: [header], "not a JSON object"),
        (set_first("dtype", "F8_E4M3"), "unsupported dtype 'F8_E4M3'"),
        (set_first("shape", [1, 2, 3]), "inconsistent data offsets"),
        (set_first("data_offsets", [0]), "no valid data_offsets"),
        (set_first("shape", 5), "has an invalid shape 5"),
    ],
)
def test_malformed_header_fails_naming_the_file(
    merge: Path, family: dict[str, Path], tmp_path: Path, edit: Callable[[dict], object], message: str
) -> None:
    shard = merge / "model-00002-of-00005.safetensors"
    rewrite_header(shard, edit)
    problems = failed(run(merge, family, tmp_path))
    assert list(problems) == ["weight files"]
    assert problems["weight files"].startswith(f"{shard}: ") and message in problems["weight files"]


def test_shard_listed_in_the_index_but_missing_fails(merge: Path, family: dict[str, Path], tmp_path: Path) -> None:
    shard = merge / "model-00003-of-00005.safetensors"
    shard.unlink()
    assert failed(run(merge, family, tmp_path)) == {"weight files": f"{shard}: listed in the index but missing"}


def test_pickle_only_weights_are_refused_unopened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pickled = make_pickle_model(tmp_path / "pickled")

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle file was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    report = validate(pickled, eval_text_path=EVAL, parents=None, cache=None)
    assert "pytorch_model.bin are refused" in failed(report)["weight files"]


def test_windows_follow_the_parameters(family: dict[str, Path]) -> None:
    report = validate(family["merge"], eval_text_path=EVAL, parents=None, cache=None, window=64, max_windows=3)
    assert report.windows == 3 and "3 window(s) of up to 64" in report.checks[3].detail


def test_inputs_that_are_not_the_candidates_fault_raise(family: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.txt"):
        validate(family["merge"], eval_text_path=tmp_path / "missing.txt", parents=None, cache=None)
    with pytest.raises(ModelError, match="not a directory"):
        validate(tmp_path / "nope", eval_text_path=EVAL, parents=None, cache=None)
    with pytest.raises(ModelError, match="org/gone"):
        validate(family["merge"], eval_text_path=EVAL, parents={"org/gone": Parent(tmp_path / "gone", "g")}, cache=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="parent"):
        validate(family["merge"], eval_text_path=EVAL, parents={"x": Parent(tmp_path / "empty", "e")}, cache=None)
