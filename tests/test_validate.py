"""The validation gate on synthetic models: a clean merge passes; every kind of broken one fails, naming why; a
broken parent is named as suspect and the merge is judged against the healthy parents only."""

import json
import math
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebot.config.daemon import ValidateSettings
from mergebot.dev.synthetic import make_model
from mergebot.errors import ConfigError, ModelError
from mergebot.files import local_identity
from mergebot.merge.io import read_header
from mergebot.pipeline import parents as parents_module
from mergebot.pipeline.gate import validate
from mergebot.pipeline.parents import Parent, SignatureCache
from mergebot.pipeline.report import ValidationReport, format_report
from tests.synth_faults import (
    add_tensor,
    drop_from_index,
    file_of,
    inflate_header_length,
    make_pickle_model,
    set_value,
    truncate,
)

EVAL = Path(__file__).resolve().parents[1] / "config" / "eval.txt"
SETTINGS = ValidateSettings(eval_text=EVAL)
STRUCTURE = ["config", "weight files", "tensors", "tokenizer"]
CONSISTENCY = ["chat template", "end of turn", "config numerics"]
ALL_CHECKS = [
    *STRUCTURE, *CONSISTENCY, "load", "finite weights", "finite logits", "parents", "perplexity", "kl divergence"
]  # fmt: skip
SHARP = 30.0
"""lm_head scale of a broken upload: logits 30x too large put its perplexity thousands of times above its family's."""


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two parents fine-tuned from one base, a sharded stand-in for their merge, and two broken uploads of b."""
    root = tmp_path_factory.mktemp("family")
    base = make_model(root / "base")
    models = {
        "a": make_model(root / "a", base=base, seed=1),
        "b": make_model(root / "b", base=base, seed=2),
        "merge": make_model(root / "merge", base=base, seed=3, shard_size=100_000),
    }
    models["sharp"] = Path(shutil.copytree(models["b"], root / "sharp"))
    scale(models["sharp"], "lm_head.weight", SHARP)
    models["nan"] = Path(shutil.copytree(models["b"], root / "nan"))
    set_value(models["nan"], "model.layers.1.mlp.up_proj.weight")
    return models


@pytest.fixture
def merge(family: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the merge that a test may break."""
    return Path(shutil.copytree(family["merge"], tmp_path / "merge"))


def scale(model_dir: Path, name: str, factor: float) -> None:
    """Multiply tensor `name` by `factor` on disk."""
    file = file_of(model_dir, name)
    tensors = load_file(file)
    tensors[name] = tensors[name] * factor
    save_file(tensors, file, metadata={"format": "pt"})


def parent(path: Path) -> Parent:
    return Parent(path, local_identity(path))


def label(name: str, path: Path) -> str:
    """How the report names a parent: its name at the first 12 digits of its identity."""
    return f"{name}@{local_identity(path).removeprefix('local:')[:12]}"


def run(
    out: Path,
    family: dict[str, Path],
    tmp_path: Path,
    revision_a: str | None = None,
    members: tuple[str, ...] = ("a", "b"),
    settings: ValidateSettings = SETTINGS,
    **kwargs: object,
) -> ValidationReport:
    """The gate on `out` with parents org/<member>, their signatures cached under tmp_path/cache (by default)."""
    parents = {f"org/{name}": parent(family[name]) for name in members}
    if revision_a:
        parents["org/a"] = Parent(family["a"], revision_a)
    kwargs.setdefault("cache", SignatureCache(tmp_path / "cache"))
    return validate(out, settings=settings, parents=parents, **kwargs)


def failed(report: ValidationReport) -> dict[str, str]:
    return {c.name: c.detail for c in report.failed_checks}


def by_name(report: ValidationReport) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks}


def test_clean_merge_passes_with_numbers(family: dict[str, Path], tmp_path: Path) -> None:
    report = run(family["merge"], family, tmp_path)
    assert report.passed, format_report(report)
    assert [c.name for c in report.checks] == ALL_CHECKS
    assert [p.name for p in report.parents] == ["org/a", "org/b"] and report.suspects == {}
    worst = max(p.ppl for p in report.parents)
    assert report.worst_parent_ppl == worst and report.limit == pytest.approx(SETTINGS.max_ppl_ratio * worst)
    assert report.ratio == pytest.approx(report.merge_ppl / worst) and 0.9 < report.ratio < 1.1
    assert report.eval_tokens > 400 and report.windows == 4 and report.peak_rss_mb > 50
    assert set(report.kl) == {"org/a", "org/b"} and all(0 < kl < 0.01 for kl in report.kl.values())
    nearest = min(report.kl, key=report.kl.get)
    assert report.nearest_parent == nearest
    assert by_name(report)["kl divergence"] == (
        f"{report.kl[nearest]:.4f} nats/token from the nearest parent {nearest} <= limit {SETTINGS.max_kl}"
    )
    text = format_report(report)
    assert "PASSED" in text and "org/b" in text and f"{report.merge_ppl:.3f}" in text and "peak RSS" in text
    assert f"KL from org/a {report.kl['org/a']:.4f} nats/token" in text and "SUSPECT" not in text


def test_parent_signature_is_measured_once_per_revision(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = run(family["merge"], family, tmp_path)
    assert [p.cached for p in first.parents] == [False, False]

    def must_not_run(*args: object) -> None:
        raise AssertionError("parent measured again despite the cache")

    monkeypatch.setattr(parents_module, "_load_parent", must_not_run)
    second = run(family["merge"], family, tmp_path)
    assert [p.cached for p in second.parents] == [True, True] and second.passed
    assert [p.ppl for p in second.parents] == [p.ppl for p in first.parents] and second.kl == first.kl
    monkeypatch.undo()
    # Measured differently (window) or at another revision: not the same entry.
    assert not any(p.cached for p in run(family["merge"], family, tmp_path, window=64).parents)
    other = run(family["merge"], family, tmp_path, revision_a="f" * 40)
    assert [p.cached for p in other.parents] == [False, True]


def test_a_corrupt_cache_only_costs_a_measurement(family: dict[str, Path], tmp_path: Path) -> None:
    first = run(family["merge"], family, tmp_path)
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 2
    files[0].write_bytes(b"{not safetensors")
    truncate(files[1])
    second = run(family["merge"], family, tmp_path)
    assert [p.cached for p in second.parents] == [False, False] and second.passed
    assert [p.ppl for p in second.parents] == [p.ppl for p in first.parents]
    assert [p.cached for p in run(family["merge"], family, tmp_path).parents] == [True, True]  # written again
    (tmp_path / "file").write_text("")
    unwritable = run(family["merge"], family, tmp_path, cache=SignatureCache(tmp_path / "file" / "cache"))
    assert unwritable.passed and not any(p.cached for p in unwritable.parents)


def test_a_broken_parent_is_suspect_and_the_merge_judged_without_it(family: dict[str, Path], tmp_path: Path) -> None:
    report = run(family["merge"], family, tmp_path, members=("a", "b", "sharp"))
    ppl = {p.name: p.ppl for p in report.parents}
    assert ppl["org/sharp"] > 100 * SETTINGS.max_parent_ratio * ppl["org/a"]  # well past the limit, not near it
    assert list(failed(report)) == ["parents"] and list(report.suspects) == ["org/sharp"]
    assert failed(report)["parents"] == report.suspects["org/sharp"]
    assert report.suspects["org/sharp"].startswith(f"{label('org/sharp', family['sharp'])}: perplexity ")
    assert "a broken upload?" in report.suspects["org/sharp"]
    # Judged by the healthy parents: the broken one's perplexity would have let anything through.
    assert report.worst_parent_ppl == max(ppl["org/a"], ppl["org/b"]) and "perplexity" in by_name(report)
    assert set(report.kl) == {"org/a", "org/b"} and "kl divergence" in by_name(report)
    text = format_report(report)
    assert "FAILED" in text and text.count("SUSPECT") == 1
    assert next(line for line in text.splitlines() if "SUSPECT" in line).strip().startswith("org/sharp ")


def test_a_parent_with_a_nan_is_suspect_and_never_cached(family: dict[str, Path], tmp_path: Path) -> None:
    report = run(family["merge"], family, tmp_path, members=("a", "nan"))
    assert list(failed(report)) == ["parents"]
    why = "perplexity is not finite (NaN or inf in its weights?)"
    assert report.suspects == {"org/nan": f"{label('org/nan', family['nan'])}: {why}"}
    assert report.worst_parent_ppl == report.parents[0].ppl and set(report.kl) == {"org/a"}
    again = run(family["merge"], family, tmp_path, members=("a", "nan"))
    assert [p.cached for p in again.parents] == [True, False]


def test_no_healthy_parent_leaves_nothing_to_judge_by(family: dict[str, Path], tmp_path: Path) -> None:
    report = run(family["merge"], family, tmp_path, members=("nan",))
    assert failed(report) == {
        "parents": report.suspects["org/nan"],
        "perplexity": "no healthy parent to compare with",
    }
    assert report.limit is None and report.kl == {}


def test_a_merge_unlike_every_parent_fails_the_kl_check(family: dict[str, Path], tmp_path: Path) -> None:
    """A model from another base: as good as the parents on the text, predicting other tokens."""
    stranger = make_model(tmp_path / "stranger", seed=9)
    strict = ValidateSettings(eval_text=EVAL, max_kl=0.001)
    report = run(stranger, family, tmp_path, settings=strict)
    assert list(failed(report)) == ["kl divergence"] and report.ratio < strict.max_ppl_ratio
    nearest = report.nearest_parent
    assert failed(report)["kl divergence"] == (
        f"{report.kl[nearest]:.4f} nats/token from the nearest parent {nearest} > limit 0.001"
    )
    assert run(family["merge"], family, tmp_path, settings=strict).passed


def test_index_dropping_a_tensor_fails_naming_it(merge: Path, family: dict[str, Path], tmp_path: Path) -> None:
    drop_from_index(merge, "model.layers.1.mlp.down_proj.weight")
    report = run(merge, family, tmp_path)
    assert not report.passed and report.merge_ppl is None and report.parents == []  # parents are not measured
    assert [c.name for c in report.checks] == STRUCTURE[:3] and list(failed(report)) == ["tensors"]
    assert "tensors: missing: model.layers.1.mlp.down_proj.weight" in report.failure_summary


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
    report = validate(tied, settings=SETTINGS, parents=None, cache=None)
    assert report.passed, format_report(report)
    assert report.checks[-1].detail.endswith("(no parents to compare with)") and report.limit is None


def test_nan_weight_fails_the_gate(merge: Path, family: dict[str, Path], tmp_path: Path) -> None:
    set_value(merge, "model.layers.2.mlp.up_proj.weight", math.nan)
    report = run(merge, family, tmp_path)
    assert failed(report) == {
        "finite weights": "NaN/inf in model.layers.2.mlp.up_proj.weight",
        "finite logits": "NaN/inf logits in window 0",
    }
    assert report.merge_ppl is None and report.kl == {} and report.limit is None
    assert [c.name for c in report.checks] == [*ALL_CHECKS[:-2]]  # the parents are still measured and named
    assert [p.name for p in report.parents] == ["org/a", "org/b"]
    assert "FAILED" in format_report(report)


def test_perplexity_far_above_parents_fails(family: dict[str, Path], tmp_path: Path) -> None:
    base = family["a"].parent / "base"
    noisy = make_model(tmp_path / "noisy", base=base, seed=4, noise=3.0)
    report = run(noisy, family, tmp_path)
    assert list(failed(report)) == ["perplexity"]
    assert report.ratio > SETTINGS.max_ppl_ratio and report.merge_ppl > report.limit
    looser = ValidateSettings(eval_text=EVAL, max_ppl_ratio=report.ratio * 1.01)
    assert run(noisy, family, tmp_path, settings=looser).passed


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
    report = validate(pickled, settings=SETTINGS, parents=None, cache=None)
    assert "pytorch_model.bin are refused" in failed(report)["weight files"]


@pytest.mark.parametrize(("window", "max_windows", "count"), [(64, 3, 3), (110, 32, 4)])
def test_windows_follow_the_parameters(family: dict[str, Path], window: int, max_windows: int, count: int) -> None:
    """441 tokens: 3 windows of 64 when capped at 3; 4 of 110, as the one token left over predicts nothing."""
    report = validate(
        family["merge"], settings=SETTINGS, parents=None, cache=None, window=window, max_windows=max_windows
    )
    assert report.eval_tokens == 441
    assert report.windows == count and f"{count} window(s) of up to {window}" in report.checks[3].detail


def test_inputs_that_are_not_the_candidates_fault_raise(family: dict[str, Path], tmp_path: Path) -> None:
    missing = ValidateSettings(eval_text=tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match=r"missing\.txt"):
        validate(family["merge"], settings=missing, parents=None, cache=None)
    (tmp_path / "blank.txt").write_text(" \n")
    with pytest.raises(ConfigError, match="empty"):
        validate(family["merge"], settings=ValidateSettings(eval_text=tmp_path / "blank.txt"))
    with pytest.raises(ConfigError, match="window >= 2"):
        validate(family["merge"], settings=SETTINGS, window=1)
    with pytest.raises(ModelError, match="not a directory"):
        validate(tmp_path / "nope", settings=SETTINGS, parents=None, cache=None)
    with pytest.raises(ModelError, match="org/gone"):
        validate(family["merge"], settings=SETTINGS, parents={"org/gone": Parent(tmp_path / "gone", "g")}, cache=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="parent"):
        validate(family["merge"], settings=SETTINGS, parents={"x": Parent(tmp_path / "empty", "e")}, cache=None)
