"""The validation gate: decide whether a merged checkpoint directory is fit to publish.

Checks run in order and stop at the first one the rest cannot do without (no config → nothing to compare against;
a missing tensor → loading would silently fill it with random values). A failed check is a result, not an
exception: `validate` returns a report and the caller turns `report.passed` into exit code 0 or 1. Exceptions
(exit 2) are kept for inputs that are not the candidate's fault: a missing eval text, an unusable parent.

Only headers are read before loading: safetensors headers are checked by `mergebot.merge.io.read_header`, and
pickle files are never opened.
"""

import math
import resource
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from mergebot.config.daemon import ValidateSettings
from mergebot.errors import ConfigError, MergebotError, ModelError
from mergebot.files import read_json
from mergebot.merge.io import TensorInfo, read_header
from mergebot.pipeline.architecture import build_on_meta, fused_parameters, parameter_names
from mergebot.pipeline.consistency import consistency_checks
from mergebot.pipeline.distance import weight_suspects
from mergebot.pipeline.facts import ModelFacts, read_facts
from mergebot.pipeline.judge import judge
from mergebot.pipeline.parents import Parent, SignatureCache, parent_results
from mergebot.pipeline.perplexity import (
    DEFAULT_MAX_WINDOWS,
    DEFAULT_WINDOW,
    Signature,
    load_model,
    load_tokenizer,
    measure,
    measure_digest,
    one_line,
    token_ids,
    windows,
)
from mergebot.pipeline.probe import ProbeResult, Prompt, read_prompts, run_probe
from mergebot.pipeline.report import Check, ValidationReport
from mergebot.progress import StepProgress

# More unknown tokens than this and the perplexity says nothing about the model: the text is mostly <unk>.
_MAX_UNKNOWN_FRACTION = 0.5
_MAX_LISTED = 8
# A failed check that does not stop the gate: the logits check after it still tells whether the NaN reaches the
# output, and the perplexity comparison still runs when it does not.
_NOT_BLOCKING = {"finite weights"}


def validate(
    out_dir: Path,
    *,
    settings: ValidateSettings,
    parents: dict[str, Parent] | None = None,
    cache: SignatureCache | None = None,
    window: int = DEFAULT_WINDOW,
    max_windows: int = DEFAULT_MAX_WINDOWS,
) -> ValidationReport:
    """Run the gate on `out_dir` and return the report (see module doc for what raises instead).

    `parents` maps a name (repo id or path) to the checkpoint to compare with; their signatures are kept in
    `cache` (if given) per (name, revision, eval text, windows). The parents are measured before the merge is
    loaded (one model in memory at a time), and the merge is judged against the healthy ones only: a broken parent
    would otherwise raise the bar it is judged by.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ModelError(f"{out_dir}: not a directory")
    if window < 2 or max_windows < 1:
        raise ConfigError(f"validate: need window >= 2 and max_windows >= 1 (got {window}, {max_windows})")
    text = _read_eval_text(settings.eval_text)
    parents = parents or {}
    candidate = _Candidate(out_dir, text, window, max_windows, read_prompts(settings.probe_prompts))
    checks: list[Check] = []
    structure = candidate.structure_steps()
    progress = StepProgress("validate", len(structure) + 1 + len(parents) + _MODEL_STEPS)
    with closing(progress):
        for step in structure:
            progress.step(_step_name(step))
            checks.append(check := step())
            if not check.passed:
                return _finish(candidate.report(checks, settings))
        progress.step("consistency (chat template, end of turn, config)")
        facts = {name: read_facts(name, parent.path) for name, parent in parents.items()}
        checks += consistency_checks(candidate.facts, list(facts.values()), frozenset(settings.accept_config_fields))
        digest = measure_digest(text, window, max_windows)
        results = parent_results(
            parents,
            text,
            window,
            max_windows,
            digest,
            cache,
            candidate.prompts,
            facts,
            lambda name: progress.step(f"measure parent {name}"),
        )
        inputs = {n: (p.model, p.path, p.revision) for n, p in parents.items()}
        damaged = weight_suspects(inputs, {r.name: r.ppl for r in results}, settings.max_weight_outlier)
        ids = torch.tensor(candidate.ids)
        comparable = [p for p in results if math.isfinite(p.ppl) and torch.equal(p.signature.ids, ids)]
        for step in candidate.model_steps([p.signature for p in comparable]):
            progress.step(_step_name(step))
            checks.append(check := step())
            if not check.passed and check.name not in _NOT_BLOCKING:
                break
    kl = {p.name: value for p, value in zip(comparable, candidate.kl, strict=False)}
    report = replace(candidate.report(checks, settings), facts={n: f.facts for n, f in facts.items()})
    return _finish(judge(report, results, kl, damaged))


_MODEL_STEPS = 3
"""How many `_Candidate.model_steps` there are (for the progress shown before they are made)."""


def _step_name(step: Callable[[], Check]) -> str:
    """`check_finite_logits` → "finite logits (perplexity and KL)": what a progress line says is under way."""
    name = step.__name__.removeprefix("check_").replace("_", " ")
    return {"load": "load merge", "finite logits": "measure merge (perplexity, KL)"}.get(name, name)


class _Candidate:
    """The checkpoint under test and what each check finds that a later one needs: the architecture built from
    config.json, the tensors the files declare, the eval text's token ids, the loaded model."""

    def __init__(self, out_dir: Path, text: str, window: int, max_windows: int, prompts: list[Prompt]) -> None:
        self.out_dir, self.text, self.window, self.max_windows = out_dir, text, window, max_windows
        self.prompts = prompts
        self.facts = ModelFacts("merge")
        self.probe: ProbeResult | None = None
        self.config_dict: dict = {}
        self.config: PretrainedConfig | None = None
        self.meta_model: torch.nn.Module | None = None
        self.declared: dict[str, TensorInfo] = {}
        self.unlisted: list[str] = []
        self.ids: list[int] = []
        self.model: torch.nn.Module | None = None
        self.merge_ppl: float | None = None
        self.references: list[Signature] = []
        self.kl: list[float] = []

    def structure_steps(self) -> tuple[Callable[[], Check], ...]:
        """What can be checked from the files alone, before any model is loaded."""
        return (self.check_config, self.check_weight_files, self.check_tensors, self.check_tokenizer)

    def model_steps(self, references: list[Signature]) -> tuple[Callable[[], Check], ...]:
        """Loading the merge and measuring it against the parents' signatures."""
        self.references = references
        return (self.check_load, self.check_finite_weights, self.check_finite_logits)

    def report(self, checks: list[Check], settings: ValidateSettings) -> ValidationReport:
        measured = self.merge_ppl is not None
        return ValidationReport(
            out_dir=self.out_dir,
            checks=checks,
            settings=settings,
            merge_ppl=self.merge_ppl,
            eval_tokens=len(self.ids) if measured else 0,
            probe=self.probe,
            windows=len(windows(self.ids, self.window, self.max_windows)) if measured else 0,
        )

    def check_config(self) -> Check:
        self.config_dict, self.config, self.meta_model, detail = _read_config(self.out_dir)
        return Check("config", self.meta_model is not None, detail)

    def check_weight_files(self) -> Check:
        self.declared, self.unlisted, problems, detail = _declared_tensors(self.out_dir)
        return Check("weight files", not problems, "; ".join(problems) or detail)

    def check_tensors(self) -> Check:
        assert self.meta_model is not None
        problems = _compare_tensors(self.meta_model, self.declared, _config_dtype(self.config_dict))
        if self.unlisted:
            problems.append(f"in a shard but not in the index: {_listing(self.unlisted)}")
        self.meta_model = None
        detail = "; ".join(problems) or f"all {len(self.declared)} tensors match the config"
        return Check("tensors", not problems, detail)

    def check_tokenizer(self) -> Check:
        try:
            tokenizer = load_tokenizer(self.out_dir)
        except Exception as exc:  # transformers raises many types for a bad tokenizer; all mean "unusable"
            return Check("tokenizer", False, one_line(exc))
        self.facts = read_facts("merge", self.out_dir)
        self.ids, unknown = token_ids(tokenizer, self.text)
        count = len(windows(self.ids, self.window, self.max_windows))
        problem = _tokenization_problem(self.ids, unknown, self.config.get_text_config().vocab_size)
        detail = problem or f"{len(self.ids)} tokens, {unknown:.1%} unknown, {count} window(s) of up to {self.window}"
        return Check("tokenizer", problem is None, detail)

    def check_load(self) -> Check:
        try:
            self.model = load_model(self.out_dir)
        except Exception as exc:  # as above: any load failure makes the candidate unpublishable
            return Check("load", False, one_line(exc))
        return Check("load", True, f"{_count_params(self.model) / 1e6:.2f}M parameters, {self.model.dtype}")

    def check_finite_weights(self) -> Check:
        bad = _non_finite_tensors(self.model)
        return Check("finite weights", not bad, f"NaN/inf in {_listing(bad)}" if bad else "no NaN or inf in any weight")

    def check_finite_logits(self) -> Check:
        result = measure(self.model, self.ids, self.window, self.max_windows, self.references)
        if result.bad_window is not None:
            self.model = None
            return Check("finite logits", False, f"NaN/inf logits in window {result.bad_window}")
        self.merge_ppl, self.kl = result.signature.ppl, result.kl
        self.probe = run_probe(self.model, self.facts, self.prompts)  # while the model is loaded; judged later
        self.model = None
        return Check("finite logits", True, "all windows finite")


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


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _config_dtype(config: dict) -> torch.dtype | None:
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _read_config(out_dir: Path) -> tuple[dict, PretrainedConfig | None, torch.nn.Module | None, str]:
    """Parse config.json and build its architecture on the meta device (no memory, no remote code): a
    vision-language model with its image-text class."""
    path = out_dir / "config.json"
    try:
        config_dict = read_json(path, str(out_dir), required=True)
        config = AutoConfig.from_pretrained(out_dir, local_files_only=True)
        model = build_on_meta(config)
    except Exception as exc:  # a missing file, bad JSON or unknown architecture all fail the same check
        return {}, None, None, f"{path}: {one_line(exc)}"
    arch, text = type(model).__name__, config.get_text_config()
    dtype = _config_dtype(config_dict)
    detail = (
        f"{arch}, {getattr(text, 'num_hidden_layers', '?')} layers, vocab {getattr(text, 'vocab_size', '?')}, "
        f"dtype {str(dtype).removeprefix('torch.') if dtype else 'not declared'}"
    )
    return config_dict, config, model, detail


def _declared_tensors(out_dir: Path) -> tuple[dict[str, TensorInfo], list[str], list[str], str]:
    """What the checkpoint declares: tensors the index lists (with their headers), tensors shards hold that the
    index does not list (loaders would not see them), problems with the files themselves, and a summary."""
    index_path = out_dir / "model.safetensors.index.json"
    if index_path.exists():
        try:
            weight_map = read_json(index_path, str(out_dir), required=True)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (MergebotError, KeyError, TypeError) as exc:
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
    """Missing, extra, wrong-shape and wrong-dtype tensors, each checkpoint name taken to the parameter it loads
    into by transformers' renamings (a vision-language checkpoint's `language_model.model.*` is the loaded
    `model.language_model.*`), experts saved one by one into the parameter they are fused into; problems name the
    file's tensors. Tied parameters (lm_head tied to embed_tokens) are
    one group: any name of the group present covers them all."""
    expected = meta_model.state_dict(keep_vars=True)
    fused = fused_parameters(meta_model, {name: info.shape for name, info in declared.items()})
    sources = {source: declared[source] for f in fused for source in f.sources}
    declared = {name: info for name, info in declared.items() if name not in sources}
    loaded_as = parameter_names(meta_model, list(declared))
    file_name = {loaded: name for name, loaded in loaded_as.items()}
    duplicates = sorted(name for name, loaded in loaded_as.items() if file_name[loaded] != name)
    declared = {loaded_as[name]: info for name, info in declared.items()}
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(id(tensor), []).append(name)
    present = set(declared) | {f.parameter for f in fused}
    missing = sorted(names[0] for names in groups.values() if not any(n in present for n in names))
    ignorable = {n for n, _ in meta_model.named_buffers()}  # non-persistent buffers (rotary) some files carry
    extra = sorted(file_name[n] for n in declared if n not in expected and n not in ignorable) + duplicates
    shape_bad = [
        f"{f.parameter} from {len(f.sources)} tensors: {list(f.shape) if f.shape else 'they do not stack'} (config "
        f"implies {list(expected[f.parameter].shape)})"
        for f in fused
        if f.shape != tuple(expected[f.parameter].shape)
    ]
    dtype_bad = [
        f"{name} {info.dtype.torch_name}" for name, info in sources.items() if dtype and info.dtype.torch != dtype
    ]
    for name, tensor in expected.items():
        if name not in declared:
            continue
        got = declared[name]
        if got.shape != tuple(tensor.shape):
            shape_bad.append(f"{file_name[name]} {list(got.shape)} (config implies {list(tensor.shape)})")
        if dtype is not None and got.dtype.torch != tensor.dtype:
            dtype_bad.append(f"{file_name[name]} {got.dtype.torch_name}")
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


def _tokenization_problem(ids: list[int], unknown: float, rows: int) -> str | None:
    if len(ids) < 2:
        return "the eval text gives fewer than 2 tokens"
    if max(ids) >= rows:
        return f"token id {max(ids)} is beyond the {rows} embedding rows"
    if unknown > _MAX_UNKNOWN_FRACTION:
        return f"{unknown:.0%} of the eval text is unknown to the tokenizer: perplexity would be meaningless"
    return None


def _count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _non_finite_tensors(model: torch.nn.Module) -> list[str]:
    with torch.no_grad():
        return [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
