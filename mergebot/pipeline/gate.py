"""The validation gate: decide whether a merged checkpoint directory is fit to publish.

Checks run in order and stop at the first one the rest cannot do without (no config → nothing to compare against;
a missing tensor → loading would silently fill it with random values). A failed check is a result, not an
exception: `validate` returns a report and the caller turns `report.passed` into exit code 0 or 1. Exceptions
(exit 2) are kept for inputs that are not the candidate's fault: a missing eval text, an unusable parent.

Only headers are read before loading: safetensors headers are checked by `mergebot.merge.io.read_header`, and
pickle files are never opened.
"""

import contextlib
import hashlib
import json
import math
import re
import resource
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from mergebot.errors import ConfigError, ModelError, ValidationFailed
from mergebot.files import write_json_atomic
from mergebot.merge.io import TensorInfo, read_header

# A merge may be somewhat worse than its weakest parent (interpolating two fine-tunes often costs a little), but a
# broken merge — wrong tokenizer rows, mis-scaled tensors, a layer from the wrong model — lands at several times
# the parents' perplexity. 1.25× the worst parent tolerates the first and catches the second.
DEFAULT_MAX_PPL_RATIO = 1.25
DEFAULT_WINDOW = 128
DEFAULT_MAX_WINDOWS = 32
PPL_CACHE_FILE = "parent_perplexity.json"

# More unknown tokens than this and the perplexity says nothing about the model: the text is mostly <unk>.
_MAX_UNKNOWN_FRACTION = 0.5
_MAX_LISTED = 8


@dataclass(frozen=True)
class Check:
    """One line of the report: a failed check blocks publishing; `detail` says what was seen."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class ParentResult:
    """A parent's perplexity and the revision it belongs to (`cached`: taken from the cache, not recomputed)."""

    name: str
    path: Path
    revision: str
    ppl: float
    cached: bool


@dataclass(frozen=True)
class ValidationReport:
    """Everything the gate saw, for the CLI table, the model card and the run record."""

    out_dir: Path
    checks: list[Check]
    merge_ppl: float | None = None
    parents: list[ParentResult] = field(default_factory=list)
    max_ppl_ratio: float = DEFAULT_MAX_PPL_RATIO
    worst_parent_ppl: float | None = None
    ratio: float | None = None
    limit: float | None = None  # perplexity limit: max_ppl_ratio × worst_parent_ppl
    eval_tokens: int = 0
    windows: int = 0
    peak_rss_mb: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def failure_summary(self) -> str:
        """One line naming every failed check and why."""
        return "; ".join(f"{c.name}: {c.detail}" for c in self.failed_checks)

    def raise_if_failed(self) -> None:
        """For pipeline code that must stop before publishing."""
        if not self.passed:
            raise ValidationFailed(f"validation of {self.out_dir} failed: {self.failure_summary}")


class PerplexityCache(Protocol):
    """Where parent perplexities are remembered, per model name, revision and `measure` (how it was measured: a
    digest from `perplexity_measure`). `get` is None on a miss; `put` must not raise for a cache that cannot be
    written, since a lost entry only costs a recomputation. `JsonPerplexityCache` (CLI) and the daemon's state
    database (`mergebot.pipeline`) implement it."""

    def get(self, name: str, revision: str, measure: str) -> float | None: ...

    def put(self, name: str, revision: str, measure: str, ppl: float) -> None: ...


def validate(
    out_dir: Path,
    *,
    eval_text_path: Path,
    parents: dict[str, Path] | None = None,
    max_ppl_ratio: float = DEFAULT_MAX_PPL_RATIO,
    cache: PerplexityCache | None = None,
    parent_revisions: dict[str, str] | None = None,
    window: int = DEFAULT_WINDOW,
    max_windows: int = DEFAULT_MAX_WINDOWS,
) -> ValidationReport:
    """Run the gate on `out_dir` and return the report (see module doc for what raises instead).

    `parents` maps a name (repo id or path) to its local checkpoint directory; its revision comes from
    `parent_revisions`, else the Hub cache snapshot directory name, else a sha256 of the directory's files. Parent
    perplexities are kept in `cache` (if given) per (name, revision, eval text, window, max_windows).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ModelError(f"{out_dir}: not a directory")
    if max_ppl_ratio <= 0 or window < 2 or max_windows < 1:
        raise ConfigError(
            f"validate: need max_ppl_ratio > 0, window >= 2, max_windows >= 1 "
            f"(got {max_ppl_ratio}, {window}, {max_windows})"
        )
    text = _read_eval_text(Path(eval_text_path))
    checks: list[Check] = []
    report = ValidationReport(out_dir=out_dir, checks=checks, max_ppl_ratio=max_ppl_ratio)

    config_dict, model_config, meta_model, detail = _check_config(out_dir)
    checks.append(Check("config", meta_model is not None, detail))
    if meta_model is None:
        return _finish(report)

    declared, unlisted, problems, detail = _declared_tensors(out_dir)
    checks.append(Check("weight files", not problems, "; ".join(problems) or detail))
    if problems:
        return _finish(report)

    problems = _compare_tensors(meta_model, declared, _config_dtype(config_dict))
    if unlisted:
        problems.append(f"in a shard but not in the index: {_listing(unlisted)}")
    del meta_model
    checks.append(
        Check("tensors", not problems, "; ".join(problems) or f"all {len(declared)} tensors match the config")
    )
    if problems:
        return _finish(report)

    try:
        tokenizer = _load_tokenizer(out_dir)
    except Exception as exc:  # transformers raises many types for a bad tokenizer; all mean "unusable"
        checks.append(Check("tokenizer", False, _one_line(exc)))
        return _finish(report)
    ids, unknown = _token_ids(tokenizer, text)
    windows = len(_windows(ids, window, max_windows))
    problem = _tokenization_problem(ids, unknown, model_config.vocab_size)
    detail = problem or f"{len(ids)} tokens, {unknown:.1%} unknown, {windows} window(s) of up to {window}"
    checks.append(Check("tokenizer", problem is None, detail))
    if problem:
        return _finish(report)

    try:
        model = _load_model(out_dir)
    except Exception as exc:  # as above: any load failure makes the candidate unpublishable
        checks.append(Check("load", False, _one_line(exc)))
        return _finish(report)
    checks.append(Check("load", True, f"{_count_params(model) / 1e6:.2f}M parameters, {model.dtype}"))

    bad = _non_finite_tensors(model)
    checks.append(
        Check("finite weights", not bad, f"NaN/inf in {_listing(bad)}" if bad else "no NaN or inf in any weight")
    )

    merge_ppl, bad_window = _perplexity(model, ids, window, max_windows)
    del model
    checks.append(
        Check(
            "finite logits",
            bad_window is None,
            f"NaN/inf logits in window {bad_window}" if bad_window is not None else "all windows finite",
        )
    )
    report = replace(report, merge_ppl=merge_ppl, eval_tokens=len(ids), windows=windows)
    if bad_window is not None:
        return _finish(report)

    measure = perplexity_measure(text, window, max_windows)
    results = [
        _parent_result(name, Path(path), text, measure, window, max_windows, cache, (parent_revisions or {}).get(name))
        for name, path in (parents or {}).items()
    ]
    finite = [p.ppl for p in results if math.isfinite(p.ppl)]
    if not results:
        checks.append(Check("perplexity", True, f"{merge_ppl:.3f} (no parents to compare with)"))
        return _finish(replace(report, parents=results))
    if not finite:
        checks.append(Check("perplexity", False, "no parent has a finite perplexity to compare with"))
        return _finish(replace(report, parents=results))
    worst = max(finite)
    limit = max_ppl_ratio * worst
    ratio = merge_ppl / worst
    ok = merge_ppl <= limit
    checks.append(
        Check(
            "perplexity",
            ok,
            f"{merge_ppl:.3f} {'<=' if ok else '>'} limit {limit:.3f} "
            f"({max_ppl_ratio} x worst parent {worst:.3f}; ratio {ratio:.3f})",
        )
    )
    return _finish(replace(report, parents=results, worst_parent_ppl=worst, ratio=ratio, limit=limit))


def format_report(report: ValidationReport) -> str:
    """A small plain-text table for the CLI: every check, then the perplexities, then peak memory."""
    lines = [f"validate {report.out_dir}: {'PASSED' if report.passed else 'FAILED'}"]
    width = max([len(c.name) for c in report.checks] + [5])
    lines.append(f"  {'check':<{width}}  result  detail")
    lines += [f"  {c.name:<{width}}  {'ok' if c.passed else 'FAIL':<6}  {c.detail}" for c in report.checks]
    if report.merge_ppl is not None:
        rows = [("merge", report.merge_ppl, "")]
        rows += [(p.name, p.ppl, p.revision + (" (cached)" if p.cached else "")) for p in report.parents]
        name_w = max(len(r[0]) for r in rows)
        lines.append("")
        lines.append(f"  {'model':<{name_w}}  {'perplexity':>12}  revision")
        lines += [f"  {name:<{name_w}}  {ppl:>12.3f}  {rev}".rstrip() for name, ppl, rev in rows]
        if report.limit is not None:
            lines.append(
                f"  ratio to worst parent {report.ratio:.3f}, limit {report.max_ppl_ratio} "
                f"(perplexity {report.limit:.3f})"
            )
    lines.append(f"  peak RSS {report.peak_rss_mb:.0f} MB")
    return "\n".join(lines)


def perplexity_measure(text: str, window: int, max_windows: int) -> str:
    """How a perplexity is measured, as one digest: the eval text's sha256, the window length and the window cap."""
    text_sha256 = hashlib.sha256(text.encode()).hexdigest()
    return hashlib.sha256(f"{text_sha256}\0{window}\0{max_windows}".encode()).hexdigest()


class JsonPerplexityCache:
    """A PerplexityCache in one JSON file, `directory/parent_perplexity.json`, for the CLI (which has no state
    database). An unreadable file counts as empty; a write replaces the file atomically, so a crash never leaves it
    half-written, and a write that fails is dropped."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def get(self, name: str, revision: str, measure: str) -> float | None:
        return self._read().get(_cache_key(name, revision, measure))

    def put(self, name: str, revision: str, measure: str, ppl: float) -> None:
        with contextlib.suppress(OSError):
            self.directory.mkdir(parents=True, exist_ok=True)
            entries = self._read()
            entries[_cache_key(name, revision, measure)] = ppl
            write_json_atomic(self.directory / PPL_CACHE_FILE, entries)

    def _read(self) -> dict[str, float]:
        try:
            entries = json.loads((self.directory / PPL_CACHE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(entries, dict):
            return {}
        return {k: float(v) for k, v in entries.items() if isinstance(v, int | float)}


def parent_revision(path: Path) -> str:
    """The revision of a local checkpoint: the commit sha of a Hub cache snapshot dir, else a content hash."""
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
        return path.name
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _cache_key(name: str, revision: str, measure: str) -> str:
    return f"{name}@{revision} {measure}"


def _read_eval_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the eval text ({exc})") from exc
    if not text.strip():
        raise ConfigError(f"{path}: the eval text is empty")
    return text


def _finish(report: ValidationReport) -> ValidationReport:
    """Stamp the peak RSS (whole process, in MB: ru_maxrss is KiB on Linux) at the moment the gate ends."""
    return replace(report, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _config_dtype(config: dict) -> torch.dtype | None:
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _check_config(out_dir: Path) -> tuple[dict, PretrainedConfig | None, torch.nn.Module | None, str]:
    """Parse config.json and build its architecture on the meta device (no memory, no remote code)."""
    path = out_dir / "config.json"
    try:
        config_dict = json.loads(path.read_text())
        config = AutoConfig.from_pretrained(out_dir, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # a missing file, bad JSON or unknown architecture all fail the same check
        return {}, None, None, f"{path}: {_one_line(exc)}"
    arch = type(model).__name__
    dtype = _config_dtype(config_dict)
    detail = (
        f"{arch}, {getattr(config, 'num_hidden_layers', '?')} layers, vocab {getattr(config, 'vocab_size', '?')}, "
        f"dtype {str(dtype).removeprefix('torch.') if dtype else 'not declared'}"
    )
    return config_dict, config, model, detail


def _declared_tensors(out_dir: Path) -> tuple[dict[str, TensorInfo], list[str], list[str], str]:
    """What the checkpoint declares: tensors the index lists (with their headers), tensors shards hold that the
    index does not list (loaders would not see them), problems with the files themselves, and a summary."""
    index_path = out_dir / "model.safetensors.index.json"
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return {}, [], [f"{index_path}: unreadable index ({exc})"], ""
    elif (out_dir / "model.safetensors").exists():
        weight_map = None
    else:
        pickles = sorted(p.name for p in out_dir.glob("*.bin")) + sorted(p.name for p in out_dir.glob("*.pt"))
        why = f" (pickle weights {', '.join(pickles)} are refused)" if pickles else ""
        return {}, [], [f"{out_dir}: no safetensors weights{why}"], ""

    files = sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]
    problems: list[str] = []
    headers: dict[str, dict[str, TensorInfo]] = {}
    for file in files:
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            problems.append(f"{index_path}: bad shard name {file!r}")
            continue
        path = out_dir / file
        if not path.is_file():
            problems.append(f"{path}: listed in the index but missing")
            continue
        try:
            headers[file] = read_header(path)[0]
        except ModelError as exc:
            problems.append(str(exc))
    if problems:
        return {}, [], problems, ""
    if weight_map is None:
        declared = headers["model.safetensors"]
        return declared, [], [], f"1 file, {len(declared)} tensors"

    declared: dict[str, TensorInfo] = {}
    for name, file in weight_map.items():
        if name in headers[file]:
            declared[name] = headers[file][name]
        else:
            problems.append(f"index maps {name} to {file}, which has no such tensor")
    unlisted = sorted(n for file, hdr in headers.items() for n in hdr if weight_map.get(n) != file)
    return declared, unlisted, problems, f"{len(files)} files, {len(declared)} tensors"


def _compare_tensors(
    meta_model: torch.nn.Module, declared: dict[str, TensorInfo], dtype: torch.dtype | None
) -> list[str]:
    """Missing, extra, wrong-shape and wrong-dtype tensors. Tied parameters (lm_head tied to embed_tokens) are one
    group: any name of the group present covers them all."""
    expected = meta_model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(id(tensor), []).append(name)
    missing = sorted(names[0] for names in groups.values() if not any(n in declared for n in names))
    ignorable = {n for n, _ in meta_model.named_buffers()}  # non-persistent buffers (rotary) some files carry
    extra = sorted(n for n in declared if n not in expected and n not in ignorable)
    shape_bad, dtype_bad = [], []
    for name, tensor in expected.items():
        if name not in declared:
            continue
        got = declared[name]
        if got.shape != tuple(tensor.shape):
            shape_bad.append(f"{name} {list(got.shape)} (config implies {list(tensor.shape)})")
        if dtype is not None and got.dtype != tensor.dtype:
            dtype_bad.append(f"{name} {str(got.dtype).removeprefix('torch.')}")
    problems = []
    if missing:
        problems.append(f"missing: {_listing(missing)}")
    if extra:
        problems.append(f"extra: {_listing(extra)}")
    if shape_bad:
        problems.append(f"wrong shape: {_listing(shape_bad)}")
    if dtype_bad:
        problems.append(f"dtype differs from config.json's {str(dtype).removeprefix('torch.')}: {_listing(dtype_bad)}")
    return problems


def _load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _load_model(model_dir: Path) -> torch.nn.Module:
    """One copy of the weights: transformers builds on meta and fills parameters straight from the mmapped
    safetensors, in the checkpoint's dtype."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", local_files_only=True)
    return model.eval()


def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], float]:
    """Ids of the eval text, with the tokenizer's BOS first (how causal LMs see a document), and the unknown
    fraction."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    unk = tokenizer.unk_token_id
    unknown = sum(1 for i in ids if i == unk) / len(ids) if ids and unk is not None else 0.0
    if tokenizer.bos_token_id is not None:
        ids.insert(0, tokenizer.bos_token_id)
    return ids, unknown


def _tokenization_problem(ids: list[int], unknown: float, rows: int) -> str | None:
    if len(ids) < 2:
        return "the eval text gives fewer than 2 tokens"
    if max(ids) >= rows:
        return f"token id {max(ids)} is beyond the {rows} embedding rows"
    if unknown > _MAX_UNKNOWN_FRACTION:
        return f"{unknown:.0%} of the eval text is unknown to the tokenizer: perplexity would be meaningless"
    return None


def _windows(ids: list[int], window: int, max_windows: int) -> list[list[int]]:
    """Fixed, non-overlapping windows; a trailing one shorter than two tokens predicts nothing and is dropped."""
    chunks = [ids[i : i + window] for i in range(0, min(len(ids), window * max_windows), window)]
    return [c for c in chunks if len(c) >= 2]


def _count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _non_finite_tensors(model: torch.nn.Module) -> list[str]:
    with torch.no_grad():
        return [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]


def _perplexity(model: torch.nn.Module, ids: list[int], window: int, max_windows: int) -> tuple[float, int | None]:
    """exp(mean next-token NLL) over fixed, non-overlapping windows, log-softmax in float32.

    Returns (perplexity, index of the first window with NaN/inf logits or None).
    """
    total_nll = 0.0
    count = 0
    with torch.inference_mode():
        for k, chunk in enumerate(_windows(ids, window, max_windows)):
            x = torch.tensor([chunk])
            logits = model(input_ids=x, use_cache=False).logits[0].float()
            if not torch.isfinite(logits).all():
                return math.nan, k
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total_nll -= float(logp.gather(1, x[0, 1:, None]).sum(dtype=torch.float64))
            count += len(chunk) - 1
    if count == 0:
        return math.nan, None
    return math.exp(total_nll / count), None


def parent_perplexity(path: Path, text: str, window: int, max_windows: int) -> float:
    """Perplexity of one parent on the eval text with its own tokenizer (NaN when its logits are not finite)."""
    try:
        tokenizer = _load_tokenizer(path)
        model = _load_model(path)
    except Exception as exc:  # any failure to load a parent is an input error, not a gate result
        raise ModelError(f"parent {path}: cannot be loaded for perplexity ({_one_line(exc)})") from exc
    ids, _ = _token_ids(tokenizer, text)
    ppl, _ = _perplexity(model, ids, window, max_windows)
    return ppl


def _parent_result(
    name: str,
    path: Path,
    text: str,
    measure: str,
    window: int,
    max_windows: int,
    cache: PerplexityCache | None,
    revision: str | None,
) -> ParentResult:
    if not path.is_dir():
        raise ModelError(f"parent {name}: {path} is not a directory")
    revision = revision or parent_revision(path)
    if cache is not None and (ppl := cache.get(name, revision, measure)) is not None:
        return ParentResult(name, path, revision, ppl, cached=True)
    ppl = parent_perplexity(path, text, window, max_windows)
    if cache is not None and math.isfinite(ppl):
        cache.put(name, revision, measure, ppl)
    return ParentResult(name, path, revision, ppl, cached=False)
