"""Config files → typed, validated merge configs; every error names the file, the key and, where known, the line.

A merge is written with the field names users know from mergekit YAML (`merge_method`, `base_model`, `models`,
`parameters`, `slices`, `dtype`, `tokenizer_source`, `out_shard_size`), either in TOML or in a mergekit YAML file.
"""

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from apscheduler.triggers.cron import CronTrigger

from mergebot.errors import ConfigError

MERGE_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "slices",
    "dtype",
    "tokenizer_source",
    "out_shard_size",
}
DTYPE_ALIASES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
DEFAULT_SHARD_SIZE = 5 * 1000**3
SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


@dataclass(frozen=True)
class ModelSpec:
    """One input model: a local directory or a Hub repo id, with an optional revision and its own parameters."""

    model: str
    revision: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    model: str
    layer_range: tuple[int, int]
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    """What to merge and how; `models` lists every distinct input model (the base included)."""

    merge_method: str
    models: tuple[ModelSpec, ...]
    listed: tuple[str, ...] = ()
    """The models named under `models`, in order (empty for a slices config)."""
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    slices: tuple[tuple[SliceSource, ...], ...] | None = None
    dtype: str | None = None
    tokenizer_source: str = "base"
    out_shard_size: int = DEFAULT_SHARD_SIZE
    source: str = "<config>"

    def spec(self, model: str) -> ModelSpec:
        return next(spec for spec in self.models if spec.model == model)

    def pinned(self, revisions: Mapping[str, str | None]) -> "MergeConfig":
        """The same merge with each model's revision fixed to the sha that was merged (for reproducibility)."""
        models = tuple(ModelSpec(m.model, revisions.get(m.model) or m.revision, m.parameters) for m in self.models)
        return replace(self, models=models)

    def _at_revision(self, model: str) -> str:
        revision = self.spec(model).revision
        return f"{model}@{revision}" if revision else model

    def as_dict(self) -> dict[str, Any]:
        """The merge config in mergekit's field names, for the model card and fingerprints."""
        result: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model:
            result["base_model"] = self._at_revision(self.base_model) if self.slices is not None else self.base_model
        if self.slices is not None:
            result["slices"] = [
                {
                    "sources": [
                        {"model": self._at_revision(s.model), "layer_range": list(s.layer_range)}
                        | ({"parameters": dict(s.parameters)} if s.parameters else {})
                        for s in sources
                    ]
                }
                for sources in self.slices
            ]
        else:
            result["models"] = [
                {"model": m.model}
                | ({"revision": m.revision} if m.revision else {})
                | ({"parameters": dict(m.parameters)} if m.parameters else {})
                for m in self.models
            ]
        if self.parameters:
            result["parameters"] = dict(self.parameters)
        if self.dtype:
            result["dtype"] = self.dtype
        result["tokenizer_source"] = self.tokenizer_source
        result["out_shard_size"] = self.out_shard_size
        return result


def parse_size(value: Any, where: str) -> int:
    """'2GB', '500MiB' or a byte count."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else None
    if not match or unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{where}: {value!r} is not a size like '2GB' or '500MiB'")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


class Located:
    """A config file's text, to point an error at the line of a key."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def error(self, key_path: str, message: str) -> ConfigError:
        leaf = re.split(r"[.\[\]]", key_path.rstrip("]"))[-1] or key_path
        pattern = re.compile(rf"(^|[\s{{,\-])\"?{re.escape(leaf)}\"?\s*[=:]")
        start = self._table_start(key_path)
        line = next((n for n, text in enumerate(self.lines[start:], start + 1) if pattern.search(text)), None)
        where = f"{self.path}:{line}" if line else str(self.path)
        return ConfigError(f"{where}: {key_path}: {message}")

    def _table_start(self, key_path: str) -> int:
        """Index of the line where the N-th [[targets]] table starts, for keys under targets[N]."""
        match = re.match(r"targets\[(\d+)\]", key_path)
        if not match:
            return 0
        headers = [n for n, text in enumerate(self.lines) if re.match(r"\s*\[\[\s*targets\s*\]\]", text)]
        index = int(match.group(1))
        return headers[index] if index < len(headers) else 0


def read_document(path: Path, text: str | None = None) -> tuple[dict[str, Any], Located]:
    """Parse TOML or YAML (by suffix), from the file or from `text` standing for it; syntax errors carry the line."""
    try:
        text = path.read_text(encoding="utf-8") if text is None else text
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: config is not UTF-8 text") from error
    if path.suffix.lower() in (".yml", ".yaml"):
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from error
    else:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: invalid TOML: {error}") from error
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the config must be a table/mapping at the top level")
    return document, Located(path, text)


def parse_merge(raw: Mapping[str, Any], located: Located, prefix: str = "") -> MergeConfig:
    """Check and type the merge fields of one target (mergekit names)."""

    def key(name: str) -> str:
        return f"{prefix}{name}"

    unknown = sorted(set(raw) - MERGE_KEYS)
    if unknown:
        raise located.error(key(unknown[0]), f"unknown key (known: {', '.join(sorted(MERGE_KEYS))})")
    method = raw.get("merge_method")
    if not isinstance(method, str) or not method:
        raise located.error(key("merge_method"), "required, e.g. 'linear', 'slerp', 'ties'")
    base_model, base_revision = _split_revision(raw.get("base_model"), located, key("base_model"))
    parameters = _parameters(raw.get("parameters", {}), located, key("parameters"))
    specs: dict[str, ModelSpec] = {}
    slices = None
    listed: tuple[str, ...] = ()
    if "slices" in raw:
        slices = _slices(raw["slices"], located, key("slices"), specs)
        if "models" in raw:
            raise located.error(key("models"), "give either models or slices, not both")
    else:
        models = raw.get("models")
        if not isinstance(models, list) or not models:
            raise located.error(key("models"), "required: a list of {model = ..., parameters = {...}}")
        for index, entry in enumerate(models):
            spec = _model_spec(entry, located, key(f"models[{index}]"))
            if spec.model in specs:
                raise located.error(key(f"models[{index}].model"), f"{spec.model} is listed twice")
            specs[spec.model] = spec
        listed = tuple(specs)
    if base_model and base_model not in specs:
        specs = {base_model: ModelSpec(base_model, base_revision), **specs}
    elif base_model and base_revision:
        specs[base_model] = ModelSpec(base_model, base_revision, specs[base_model].parameters)
    dtype = raw.get("dtype")
    if dtype is not None and DTYPE_ALIASES.get(str(dtype).lower()) is None:
        raise located.error(key("dtype"), f"{dtype!r} is not one of bfloat16, float16, float32")
    tokenizer_source = raw.get("tokenizer_source", "base")
    if not isinstance(tokenizer_source, str):
        raise located.error(key("tokenizer_source"), "must be 'base' or one of the models")
    if tokenizer_source != "base" and tokenizer_source not in specs:
        raise located.error(key("tokenizer_source"), f"{tokenizer_source!r} is neither 'base' nor one of the models")
    if tokenizer_source == "base":
        tokenizer_source = base_model or next(iter(specs))
    return MergeConfig(
        merge_method=method,
        models=tuple(specs.values()),
        listed=listed,
        base_model=base_model,
        parameters=parameters,
        slices=slices,
        dtype=DTYPE_ALIASES[str(dtype).lower()] if dtype is not None else None,
        tokenizer_source=tokenizer_source,
        out_shard_size=parse_size(raw.get("out_shard_size", DEFAULT_SHARD_SIZE), key("out_shard_size")),
        source=str(located.path),
    )


def _split_revision(value: Any, located: Located, where: str) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, str) or not value:
        raise located.error(where, "must be a model path or repo id")
    if "@" in value and not Path(value).exists():
        model, _, revision = value.rpartition("@")
        return model, revision
    return value, None


def _model_spec(entry: Any, located: Located, where: str) -> ModelSpec:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict):
        raise located.error(where, "must be a table with a 'model' key")
    unknown = sorted(set(entry) - {"model", "revision", "parameters"})
    if unknown:
        raise located.error(f"{where}.{unknown[0]}", "unknown key (known: model, revision, parameters)")
    model, revision = _split_revision(entry.get("model"), located, f"{where}.model")
    if model is None:
        raise located.error(f"{where}.model", "required")
    revision = entry.get("revision", revision)
    if revision is not None and not isinstance(revision, str):
        raise located.error(f"{where}.revision", "must be a branch, tag or commit sha")
    return ModelSpec(model, revision, _parameters(entry.get("parameters", {}), located, f"{where}.parameters"))


def _slices(value: Any, located: Located, where: str, specs: dict[str, ModelSpec]) -> tuple:
    if not isinstance(value, list) or not value:
        raise located.error(where, "must be a list of {sources = [...]}")
    slices = []
    for index, entry in enumerate(value):
        sources = entry.get("sources") if isinstance(entry, dict) else None
        if not isinstance(sources, list) or not sources:
            raise located.error(f"{where}[{index}].sources", "required: a list of {model, layer_range}")
        parsed = []
        for number, source in enumerate(sources):
            at = f"{where}[{index}].sources[{number}]"
            if not isinstance(source, dict):
                raise located.error(at, "must be a table with model and layer_range")
            spec = _model_spec({k: v for k, v in source.items() if k != "layer_range"}, located, at)
            layer_range = source.get("layer_range")
            if not (
                isinstance(layer_range, list)
                and len(layer_range) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in layer_range)
                and 0 <= layer_range[0] < layer_range[1]
            ):
                raise located.error(f"{at}.layer_range", "must be [first, end) with 0 <= first < end")
            specs.setdefault(spec.model, ModelSpec(spec.model, spec.revision))
            parsed.append(SliceSource(spec.model, (layer_range[0], layer_range[1]), spec.parameters))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in parsed}
        if len(lengths) > 1:
            raise located.error(f"{where}[{index}].sources", "all sources of a slice need the same number of layers")
        slices.append(tuple(parsed))
    return tuple(slices)


def _parameters(value: Any, located: Located, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise located.error(where, "must be a table of parameter values")
    for name, setting in value.items():
        _check_setting(setting, located, f"{where}.{name}")
    return dict(value)


def _check_setting(setting: Any, located: Located, where: str) -> None:
    """A number or bool; a list of numbers (a gradient across layers); or a list of {filter, value} conditions."""
    if isinstance(setting, bool | int | float):
        return
    if isinstance(setting, list) and setting and all(_is_number(v) for v in setting):
        return
    if isinstance(setting, list) and setting and all(isinstance(v, dict) for v in setting):
        for index, condition in enumerate(setting):
            unknown = sorted(set(condition) - {"filter", "value"})
            if unknown or "value" not in condition:
                raise located.error(f"{where}[{index}]", "a condition is {filter = '...', value = ...}")
            if "filter" in condition and not isinstance(condition["filter"], str):
                raise located.error(f"{where}[{index}].filter", "must be a string found in tensor names")
            if isinstance(condition["value"], dict):
                raise located.error(f"{where}[{index}].value", "must be a number or a list of numbers")
            _check_setting(condition["value"], located, f"{where}[{index}].value")
        return
    raise located.error(where, "must be a number, a list of numbers, or a list of {filter, value}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_merge_config(path: Path, target: str | None = None) -> MergeConfig:
    """A merge from a TOML target (top-level fields or one of [[targets]]) or a mergekit YAML file."""
    document, located = read_document(path)
    if "targets" in document:
        targets = document["targets"]
        if not isinstance(targets, list) or not targets:
            raise located.error("targets", "must be a list of [[targets]] tables")
        names = [t.get("name") for t in targets if isinstance(t, dict)]
        if target is None and len(targets) > 1:
            raise ConfigError(f"{path}: several targets ({', '.join(map(str, names))}); choose one with --target")
        index = 0 if target is None else names.index(target) if target in names else -1
        if index < 0:
            raise ConfigError(f"{path}: no target named {target!r} (targets: {', '.join(map(str, names))})")
        return target_merge(targets[index], located, f"targets[{index}].")
    if "mergekit_config" in document:
        return target_merge(document, located, "")
    return parse_merge(document, located)


def target_merge(raw: Mapping[str, Any], located: Located, prefix: str) -> MergeConfig:
    """The merge part of a target: inline fields, or `mergekit_config` naming a YAML file beside the config."""
    merge_fields = {k: v for k, v in raw.items() if k in MERGE_KEYS}
    if "mergekit_config" in raw:
        yaml_path = located.path.parent / str(raw["mergekit_config"])
        if merge_fields:
            first = next(iter(merge_fields))
            raise located.error(f"{prefix}mergekit_config", f"give mergekit_config or inline {first}, not both")
        document, yaml_located = read_document(yaml_path)
        return parse_merge(document, yaml_located)
    return parse_merge(merge_fields, located, prefix)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DAEMON_KEYS = {
    "state_dir",
    "poll_interval",
    "schedule",
    "hub_endpoint",
    "max_concurrent_merges",
    "merge_timeout",
    "stop_grace",
    "debounce",
    "retry_delay",
    "max_retries",
    "webhook",
    "metrics_listen",
}
TARGET_KEYS = {"name", "repo", "when", "private", "validate", "mergekit_config"} | MERGE_KEYS
DEFAULT_EVAL_TEXT = Path(__file__).parent / "data" / "eval.txt"


@dataclass(frozen=True)
class ValidateSettings:
    eval_text: Path = DEFAULT_EVAL_TEXT
    max_ppl_ratio: float = 1.25


@dataclass(frozen=True)
class Target:
    """One merged model the daemon keeps up to date: where it is published, when it runs, how it is checked."""

    name: str
    repo: str
    merge: MergeConfig
    when: str = "on_change"
    private: bool = False
    validate: ValidateSettings = field(default_factory=ValidateSettings)
    config_hash: str = ""
    """Changes whenever anything that shapes the published result changes."""


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path
    poll_interval: float = 900.0
    schedule: str = "0 3 * * *"
    hub_endpoint: str | None = None
    max_concurrent_merges: int = 1
    merge_timeout: float = 6 * 3600.0
    stop_grace: float = 30.0
    debounce: float = 60.0
    retry_delay: float = 300.0
    max_retries: int = 5
    webhook_listen: tuple[str, int] | None = None
    webhook_secret_env: str = "MERGEBOT_WEBHOOK_SECRET"
    metrics_listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class DaemonConfig:
    path: Path
    daemon: DaemonSettings
    targets: dict[str, Target]


def parse_duration(value: Any, where: str, located: Located) -> float:
    """'15m', '30s', '6h', '1d' or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(value))
    if not match:
        raise located.error(where, f"{value!r} is not a duration like '30s', '15m', '6h' or '1d'")
    return float(match.group(1)) * DURATION_UNITS[match.group(2)]


def _listen(value: Any, where: str, located: Located) -> tuple[str, int]:
    host, _, port = str(value).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise located.error(where, f"{value!r} is not host:port")
    return host, int(port)


def load_daemon_config(path: Path, text: str | None = None) -> DaemonConfig:
    """The whole daemon config; the first problem found is raised with its key and line."""
    config, problems = check_daemon_config(path, text)
    if problems:
        raise problems[0]
    assert config is not None
    return config


def check_daemon_config(path: Path, text: str | None = None) -> tuple[DaemonConfig | None, list[ConfigError]]:
    """Everything that can be checked offline; every target is checked, so all problems are reported at once.

    `text`, when given, is the file's content as the daemon accepted it (relative paths still resolve beside
    `path`), so a merge child works from the running config even after a broken edit on disk."""
    try:
        document, located = read_document(path, text)
        daemon = _daemon_settings(document.get("daemon", {}), located)
    except ConfigError as error:
        return None, [error]
    problems: list[ConfigError] = []
    unknown = sorted(set(document) - {"daemon", "targets"})
    problems += [located.error(key, "unknown top-level key (known: daemon, targets)") for key in unknown]
    raw_targets = document.get("targets", [])
    if not isinstance(raw_targets, list):
        return None, [*problems, located.error("targets", "must be a list of [[targets]] tables")]
    targets: dict[str, Target] = {}
    for index, raw in enumerate(raw_targets):
        try:
            target = _target(raw, located, f"targets[{index}].")
            if target.name in targets:
                raise located.error(f"targets[{index}].name", f"{target.name!r} is used by two targets")
            targets[target.name] = target
        except ConfigError as error:
            problems.append(error)
    return DaemonConfig(path, daemon, targets), problems


def _daemon_settings(raw: Any, located: Located) -> DaemonSettings:
    if not isinstance(raw, dict):
        raise located.error("daemon", "must be a table")
    unknown = sorted(set(raw) - DAEMON_KEYS)
    if unknown:
        raise located.error(f"daemon.{unknown[0]}", f"unknown key (known: {', '.join(sorted(DAEMON_KEYS))})")
    state_dir = os.environ.get("MERGEBOT_STATE_DIR") or raw.get("state_dir")
    if not state_dir:
        raise located.error("daemon.state_dir", "required (or set MERGEBOT_STATE_DIR)")
    schedule = str(raw.get("schedule", "0 3 * * *"))
    try:
        CronTrigger.from_crontab(schedule)
    except ValueError as error:
        raise located.error("daemon.schedule", f"{schedule!r} is not a cron expression ({error})") from error
    durations = {
        key: parse_duration(raw[key], f"daemon.{key}", located)
        for key in ("poll_interval", "merge_timeout", "stop_grace", "debounce", "retry_delay")
        if key in raw
    }
    for key in ("max_concurrent_merges", "max_retries"):
        if key in raw and not (isinstance(raw[key], int) and raw[key] >= 1):
            raise located.error(f"daemon.{key}", "must be a whole number >= 1")
    webhook = raw.get("webhook")
    if webhook is not None and not isinstance(webhook, dict):
        raise located.error("daemon.webhook", "must be a table with listen and secret_env")
    return DaemonSettings(
        state_dir=(located.path.parent / Path(state_dir).expanduser()).resolve(),
        schedule=schedule,
        hub_endpoint=raw.get("hub_endpoint"),
        max_concurrent_merges=raw.get("max_concurrent_merges", 1),
        max_retries=raw.get("max_retries", 5),
        webhook_listen=_listen(webhook["listen"], "daemon.webhook.listen", located) if webhook else None,
        webhook_secret_env=str((webhook or {}).get("secret_env", "MERGEBOT_WEBHOOK_SECRET")),
        metrics_listen=_listen(raw["metrics_listen"], "daemon.metrics_listen", located)
        if "metrics_listen" in raw
        else None,
        **durations,
    )


def _target(raw: Any, located: Located, prefix: str) -> Target:
    if not isinstance(raw, dict):
        raise located.error(prefix.rstrip("."), "must be a [[targets]] table")
    unknown = sorted(set(raw) - TARGET_KEYS)
    if unknown:
        raise located.error(f"{prefix}{unknown[0]}", f"unknown key (known: {', '.join(sorted(TARGET_KEYS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise located.error(f"{prefix}name", "required: letters, digits, '.', '_' or '-'")
    repo = raw.get("repo")
    if not isinstance(repo, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
        raise located.error(f"{prefix}repo", "required: the Hub repo to publish to, as org/name")
    when = raw.get("when", "on_change")
    if when not in ("on_change", "nightly"):
        raise located.error(f"{prefix}when", f"{when!r} is not 'on_change' or 'nightly'")
    validate_raw = raw.get("validate", {})
    if not isinstance(validate_raw, dict) or set(validate_raw) - {"eval_text", "max_ppl_ratio"}:
        raise located.error(f"{prefix}validate", "a table with eval_text and max_ppl_ratio")
    eval_text = DEFAULT_EVAL_TEXT
    if "eval_text" in validate_raw:
        eval_text = (located.path.parent / str(validate_raw["eval_text"])).resolve()
        if not eval_text.is_file():
            raise located.error(f"{prefix}validate.eval_text", f"{eval_text} does not exist")
    ratio = validate_raw.get("max_ppl_ratio", 1.25)
    if not isinstance(ratio, int | float) or isinstance(ratio, bool) or ratio <= 1.0:
        raise located.error(f"{prefix}validate.max_ppl_ratio", "must be a number above 1")
    merge = target_merge(raw, located, prefix)
    digest = hashlib.sha256(
        json.dumps([merge.as_dict(), repo, bool(raw.get("private", False)), str(eval_text), ratio]).encode()
    ).hexdigest()
    return Target(
        name=name,
        repo=repo,
        merge=merge,
        when=when,
        private=bool(raw.get("private", False)),
        validate=ValidateSettings(eval_text, float(ratio)),
        config_hash=digest,
    )
