"""The GGUF files of a merge that passed the gate: one per requested type, made in the run's work directory and
checked there; only the files that pass go to the Hub.

Each file keeps a fingerprint of what made it (the merged shards' fingerprints, the merge's config and tokenizer
files, the type, the converter's version, the check's inputs) beside it with its verdict, so a run that recomputed
no shard neither converts nor checks again, and a run whose only change is a GGUF setting converts without merging.
"""

import hashlib
import importlib.metadata
import json
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from mergebot import gguf as converter
from mergebot import log
from mergebot.config.daemon import ValidateSettings
from mergebot.config.gguf import GgufSettings
from mergebot.config.merge import MergeConfig
from mergebot.errors import GgufError, MergebotError
from mergebot.files import METADATA_FILES, FileHashes, default_cache_dir, parse_json, write_json_atomic
from mergebot.gguf.convert import GgufFile, write_gguf
from mergebot.hub.client import HubClient
from mergebot.pipeline.gguf_check import MergeFigures, check_gguf
from mergebot.pipeline.probe import read_prompts
from mergebot.pipeline.publish import PublishResult, publish_gguf_repo
from mergebot.pipeline.report import ValidationReport
from mergebot.runrecord import GgufResult

FINGERPRINT_FORMAT = 1


@dataclass(frozen=True)
class GgufFiles:
    """What a run made: every type's result, and the files that passed, by their name in the repo."""

    results: dict[str, GgufResult]
    passed: dict[str, Path]


def make_gguf(
    merged: Path,
    work: Path,
    settings: GgufSettings,
    fingerprints: dict[str, str],
    validate: ValidateSettings,
    report: ValidationReport,
) -> GgufFiles:
    """Each requested type written into `work` and checked against the merge in `merged` (with the figures its
    gate measured, `report`), or taken from an earlier run that made it from the same files; a type that cannot
    be made or fails its checks is left out."""
    logger = log.get("pipeline")
    work.mkdir(parents=True, exist_ok=True)
    hashes = FileHashes(default_cache_dir())
    inputs = _inputs(merged, fingerprints, validate, hashes)
    results: dict[str, GgufResult] = {}
    for file_type in settings.types:
        name = settings.file_name(file_type)
        path = work / name
        fingerprint = _digest({"format": FINGERPRINT_FORMAT, "type": file_type, **inputs})
        started = time.monotonic()
        result = _earlier(path, fingerprint, hashes)
        if result is None:
            result = _convert_and_check(merged, path, file_type, validate, report)
            write_json_atomic(_sidecar(path), {"fingerprint": fingerprint, "result": result})
        results[file_type] = result | GgufResult(file=name, repo=settings.repo)
        logger.info(
            "gguf", type=file_type, passed=result["passed"], reused=result["reused"], reason=result["reason"],
            seconds=round(time.monotonic() - started, 3),
        )  # fmt: skip
    names = {settings.file_name(file_type) for file_type in settings.types}
    for stale in work.iterdir():  # types no longer asked for, and what a killed conversion left
        if stale.is_file() and stale.name not in names | {_sidecar(work / name).name for name in names}:
            stale.unlink()
    passed = {result["file"]: work / result["file"] for result in results.values() if result["passed"]}
    return GgufFiles(results, passed)


def _convert_and_check(
    merged: Path, path: Path, file_type: str, validate: ValidateSettings, report: ValidationReport
) -> GgufResult:
    """One type converted and checked; what refuses it (an architecture or tokenizer the converter does not write,
    a failed check) is its result's reason, and its file is not kept."""
    _sidecar(path).unlink(missing_ok=True)
    prompts = read_prompts(validate.probe_prompts)
    figures = MergeFigures(report.merge_ppl, report.probe) if report.merge_ppl is not None else None
    try:
        made: GgufFile = write_gguf(merged, path, file_type)
        verdict = check_gguf(made, merged, validate.eval_text.read_text(encoding="utf-8"), merge=figures,
                             prompts=prompts)  # fmt: skip
    except GgufError as error:
        path.unlink(missing_ok=True)
        return GgufResult(size=0, sha256="", perplexity=None, stop_rate=None, passed=False, reason=str(error),
                          checked="", published=False, reused=False)  # fmt: skip
    if not verdict.passed:
        path.unlink(missing_ok=True)
    stops = verdict.probe_stopped
    return GgufResult(
        size=made.size, sha256=made.sha256, perplexity=verdict.perplexity,
        stop_rate=stops / len(prompts) if stops is not None and prompts else None, passed=verdict.passed,
        reason=None if verdict.passed else verdict.reason, checked=verdict.reason if verdict.passed else "",
        published=False, reused=False,
    )  # fmt: skip


def _earlier(path: Path, fingerprint: str, hashes: FileHashes) -> GgufResult | None:
    """The result an earlier run recorded for exactly these inputs, when its file (if it passed) is still there,
    byte for byte."""
    sidecar = _sidecar(path)
    try:
        recorded = parse_json(sidecar.read_bytes(), str(sidecar), sidecar.name)
    except (OSError, MergebotError):
        return None
    if not isinstance(recorded, dict) or recorded.get("fingerprint") != fingerprint:
        return None
    result = recorded.get("result")
    if not isinstance(result, dict):
        return None
    if result.get("passed") and (not path.is_file() or hashes.sha256(path) != result.get("sha256")):
        return None
    return GgufResult(**result) | {"reused": True, "published": False}


def _inputs(merged: Path, fingerprints: dict[str, str], validate: ValidateSettings, hashes: FileHashes) -> dict:
    """What a GGUF file and its verdict are made from, besides its type."""
    files = {name: hashes.sha256(merged / name) for name in METADATA_FILES if (merged / name).is_file()}
    checked = {str(p): hashes.sha256(p) for p in (validate.eval_text, validate.probe_prompts)}
    return {"converter": converter_version(), "shards": fingerprints, "files": files, "check": checked}


@cache
def converter_version() -> str:
    """The converter as it is installed: its own code and the libraries that write and quantize, so an upgrade of
    either converts again."""
    code = hashlib.sha256()
    for source in sorted(Path(converter.__file__).parent.glob("*.py")):
        code.update(source.name.encode() + b"\0" + source.read_bytes())
    libraries = []
    for package in ("gguf", "llama-cpp-python"):
        try:
            libraries.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            libraries.append(f"{package} absent")
    return f"{code.hexdigest()[:16]} {' '.join(libraries)}"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def publish_elsewhere(
    gguf: GgufFiles,
    settings: GgufSettings,
    client: HubClient,
    merged: MergeConfig,
    published: PublishResult,
    *,
    private: bool,
    description: str,
) -> PublishResult | None:
    """The checked files committed to the sibling repo right after the merge's own commit. A failed commit leaves
    the merge's revision published and says why in each file's result; the daemon runs the target again at its next
    poll to retry it (`decide`)."""
    try:
        result = publish_gguf_repo(
            settings.repo, client, gguf.passed, gguf.results, merged, published.repo, published.commit,
            private=private, description=description,
        )  # fmt: skip
    except MergebotError as error:
        for file_result in gguf.results.values():
            if file_result["passed"]:
                file_result["reason"] = f"the commit to {settings.repo} failed: {error}"
        return None
    mark_published(gguf)
    return result


def mark_published(gguf: GgufFiles) -> None:
    """The files that passed are in the repo's head now."""
    for result in gguf.results.values():
        result["published"] = result["passed"]
