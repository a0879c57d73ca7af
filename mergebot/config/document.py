"""Reading config documents (TOML, or YAML by suffix) and pointing an error at the file, key and line.

Also the value formats every config table shares: sizes ('2GB'), durations ('15m') and listen addresses.
"""

import difflib
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mergebot.errors import ConfigError, ConfigErrors
from mergebot.files import check_depth, read_small

T = TypeVar("T")

SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Located:
    """A config file's text, to point an error at the line of a key."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def error(self, key_path: str, message: str, value: str | None = None, at: str | None = None) -> ConfigError:
        """`value`: the text the problem is about, when it pins the line better than the key does (a key written
        many times, like `model`); `at`: the key whose line to point at, when the key at fault is not written."""
        line = self._value_line(at or key_path, value) if value else None
        line = line or self._line(at or key_path)
        where = f"{self.path}:{line}" if line else str(self.path)
        return ConfigError(f"{where}: {key_path}: {message}")

    def has_line(self, key_path: str) -> bool:
        """Whether the key itself (not only a table around it) is written."""
        last = re.split(r"[.\[\]]", key_path.rstrip("]"))[-1]
        setting = re.compile(rf"(^|[\s{{,\-])\"?{re.escape(last)}\"?\s*[=:]")
        start, end = self._table_span(key_path)
        return any(setting.search(text) for text in self.lines[start:end])

    def where(self, key_path: str) -> str:
        """`file:line: key`, for a message written after the file was read."""
        return str(self.error(key_path, "")).removesuffix(": ")

    def check_keys(self, table: Mapping[str, Any], known: Collection[str], prefix: str) -> None:
        """Raise for the first key of `table` (whose keys are named `prefix` + key) that is not in `known`."""
        problems = self.unknown_keys(table, known, prefix)
        if problems:
            raise problems[0]

    def unknown_keys(self, table: Mapping[str, Any], known: Collection[str], prefix: str) -> list[ConfigError]:
        """One error per unknown key, for a report that lists every problem at once."""
        listing = f"unknown key (known: {', '.join(sorted(known))})"
        return [
            self.error(f"{prefix}{key}", listing + did_you_mean(str(key), known))
            for key in sorted(set(table) - set(known), key=str)
        ]

    def _line(self, key_path: str) -> int | None:
        """The line that sets the key, each part of its path looked for from where the part before it was found;
        for a missing key, the line of the nearest table around it."""
        start, end = self._table_span(key_path)
        names = [name for name in re.split(r"[.\[\]]", key_path) if name and not name.isdigit()]
        found = None
        for name in names:
            setting = re.compile(rf"(^|[\s{{,\-])\"?{re.escape(name)}\"?\s*[=:]")
            header = re.compile(rf"^\s*\[\[?[^\]]*\b{re.escape(name)}\s*\]")
            for number, text in enumerate(self.lines[start:end], start + 1):
                if setting.search(text) or header.search(text):
                    found, start = number, number - 1
                    break
        return found

    def _value_line(self, key_path: str, value: str) -> int | None:
        """The first line, from the key's table on, that sets the key to a text with `value` as a whole word."""
        name = next((n for n in reversed(re.split(r"[.\[\]]", key_path)) if n and not n.isdigit()), key_path)
        setting = re.compile(rf"(^|[\s{{,\-])\"?{re.escape(name)}\"?\s*[=:]")
        written = re.compile(rf"(?<![\w./@+-]){re.escape(value)}(?![\w./-])")
        start, end = self._table_span(key_path)
        lines = enumerate(self.lines[start:end], start + 1)
        return next((n for n, text in lines if setting.search(text) and written.search(text)), None)

    def _table_span(self, key_path: str) -> tuple[int, int]:
        """Indexes of the lines where the N-th [[targets]] or [[notify]] table starts and where the next one does,
        for keys under targets[N] or notify[N]; the whole file for other keys."""
        match = re.match(r"(targets|notify)\[(\d+)\]", key_path)
        if not match:
            return 0, len(self.lines)
        header = re.compile(rf"\s*\[\[\s*{match.group(1)}\s*\]\]")
        headers = [n for n, text in enumerate(self.lines) if header.match(text)]
        index = int(match.group(2))
        if index >= len(headers):
            return 0, len(self.lines)
        return headers[index], headers[index + 1] if index + 1 < len(headers) else len(self.lines)


def did_you_mean(name: str, known: Collection[str]) -> str:
    """'; did you mean 'x'?' for the known name closest to a misspelt one, or nothing."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclass
class Findings:
    """Every problem and warning in one config, to report them all at once rather than one per run."""

    located: Located
    strict: bool = False
    """Refuse what mergekit would ignore: for mergebot's own forms (the command line), not a mergekit config."""
    problems: list[ConfigError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def warn(self, key_path: str, message: str, value: str | None = None) -> None:
        self.warnings.append(str(self.located.error(key_path, message, value)))

    def ignored(self, key_path: str, why: str, value: str | None = None) -> None:
        """What mergekit reads and ignores: the same merge, and one warning line saying so."""
        if self.strict:
            self.add(self.located.error(key_path, why, value))
        else:
            self.warn(key_path, f"ignored, as mergekit does: {why}", value)

    def attempt(self, check: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """`check`'s result, or None with its problems noted."""
        try:
            return check(*args, **kwargs)
        except ConfigError as error:
            self.add(error)
            return None

    def add(self, error: ConfigError) -> None:
        self.problems.extend(error.problems if isinstance(error, ConfigErrors) else [error])

    def raise_problems(self) -> None:
        if self.problems:
            raise ConfigErrors(self.problems, tuple(dict.fromkeys(self.warnings)))


class _YamlLoader(yaml.SafeLoader):
    """YAML as mergekit users write it: `1e-6` is a number (YAML 1.2), not the string PyYAML's YAML 1.1 makes it."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_document(path: Path, text: str | None = None) -> tuple[dict[str, Any], Located]:
    """Parse TOML or YAML (by suffix), from the file or from `text` standing for it; syntax errors carry the line."""
    text = read_config_text(path) if text is None else text
    if path.suffix.lower() in (".yml", ".yaml"):
        try:
            document = yaml.load(text, Loader=_YamlLoader)
        except RecursionError:
            raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            if isinstance(error, yaml.composer.ComposerError) and "single document" in str(error):
                problem = (
                    "several YAML documents: a multi-stage merge, which `mergebot merge FILE OUT_DIR` runs; a daemon "
                    'target chains stages as targets instead (model = "target:NAME")'
                )
            raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from error
    else:
        try:
            document = tomllib.loads(text)
        except RecursionError:
            raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: invalid TOML: {error}") from error
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the config must be a table/mapping at the top level")
    check_depth(document, str(path), "the config")
    return document, Located(path, text)


def read_config_text(path: Path) -> str:
    """A config file's text, within the small-file size limit."""
    try:
        return read_small(path, str(path), ConfigError).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: config is not UTF-8 text (byte {error.start})") from error


def parse_size(value: Any, where: str, located: Located) -> int:
    """'2GB', '500MiB' or a byte count."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else None
    if not match or unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise located.error(where, f"{value!r} is not a size like '2GB' or '500MiB'")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def parse_duration(value: Any, where: str, located: Located) -> float:
    """'15m', '30s', '6h', '1d' or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(value))
    if not match:
        raise located.error(where, f"{value!r} is not a duration like '30s', '15m', '6h' or '1d'")
    return float(match.group(1)) * DURATION_UNITS[match.group(2)]


def listen_address(value: Any, where: str, located: Located) -> tuple[str, int]:
    """'127.0.0.1:8765' as the (host, port) that servers bind to."""
    host, _, port = str(value).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise located.error(where, f"{value!r} is not host:port")
    return host, int(port)
