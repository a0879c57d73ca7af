"""Files on disk: the names a Hugging Face checkpoint is made of, reading its small JSON files, and writing
files atomically (temp file + fsync + rename). No torch here: the daemon imports this."""

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from mergebot.errors import FileLimitError, MergebotError, ModelError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
METADATA_FILES = ("config.json", "generation_config.json", INDEX_FILE, *TOKENIZER_FILES)
ADAPTER_CONFIG = "adapter_config.json"
"""A PEFT adapter's settings (its weights are adapter_model.safetensors)."""
SMALL_FILE_LIMIT = 16 << 20
"""The most bytes of a config, tokenizer config, chat template or config file mergebot reads."""
FILE_LIMITS = {"tokenizer.json": 128 << 20, INDEX_FILE: 64 << 20}
"""Larger limits where real files are larger (a big vocabulary's tokenizer.json is tens of MB)."""
SAFETENSORS_HEADER_LIMIT = 100 << 20
"""The most bytes of a safetensors header (the format's own limit)."""
JSON_DEPTH_LIMIT = 64
"""Real configs and tokenizers nest under 10 deep."""
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
"""Keys of config.json and tokenizer_config.json that point transformers at Python code in some repo."""
UNSHOWN = re.compile(r"[^\w-]")
DROPPED_KEY = "mergebot_dropped"
"""Where the output's index metadata lists the remote-code pointers the merge left out, for the model card."""


def is_merge_input(name: str) -> bool:
    """The files of a checkpoint a merge reads: top-level safetensors, the index, config and tokenizer files, and a
    LoRA adapter's config. Anything else (README.md, pickles, subfolders) never changes a merge and is never
    downloaded."""
    return name in (*METADATA_FILES, ADAPTER_CONFIG) or ("/" not in name and name.endswith(".safetensors"))


def git_blob_id(data: bytes) -> str:
    """The id git (and so the Hub) gives a file's content: sha1 of a "blob" header and the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def size_limit(name: str) -> int:
    """The most bytes mergebot reads of a small file it parses (config, tokenizer, index, safetensors header)."""
    return FILE_LIMITS.get(name, SMALL_FILE_LIMIT)


def read_small(path: Path, where: str, error: type[MergebotError] = ModelError) -> bytes:
    """The bytes of a small file, refused with one line (FileLimitError) when it is over `size_limit`: checked
    before reading, and never reading more than the limit if it grows meanwhile. `error` is for an unreadable one."""
    limit = size_limit(path.name)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            data = handle.read(limit + 1) if size <= limit else b""
    except OSError as failure:
        raise error(f"{where}: cannot read {path.name} ({failure.strerror})") from failure
    if size > limit or len(data) > limit:
        raise FileLimitError(f"{where}: {path.name} is {max(size, len(data))} bytes, over the {limit} mergebot reads")
    return data


def parse_json(data: bytes | str, where: str, name: str, error: type[MergebotError] = ModelError) -> object:
    """JSON nested at most JSON_DEPTH_LIMIT deep (else FileLimitError), `error` when it is not JSON: one line naming
    the file, never a traceback (json's own RecursionError included)."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise FileLimitError(_too_deep(where, name)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as failure:
        raise error(f"{where}: {name} is not valid JSON ({failure})") from None
    check_depth(value, where, name)
    return value


def check_depth(value: object, where: str, name: str) -> None:
    """Refuse a parsed document whose arrays and objects nest deeper than JSON_DEPTH_LIMIT (what reads it later
    may recurse), walked level by level without recursion, each object once: a 30 MB tokenizer.json takes a
    fraction of its parse, a YAML alias bomb no more than its text."""
    level, depth = [value], 1
    while level:
        objects = [item for item in level if type(item) is dict]
        arrays = [item for item in level if type(item) is list]
        children = [child for item in objects for child in item.values() if type(child) in (dict, list)]
        children += [child for item in arrays for child in item if type(child) in (dict, list)]
        level = list({id(child): child for child in children}.values())  # YAML aliases share one object
        if level and depth >= JSON_DEPTH_LIMIT:
            raise FileLimitError(_too_deep(where, name))
        depth += 1


def _too_deep(where: str, name: str) -> str:
    return f"{where}: {name} is nested deeper than {JSON_DEPTH_LIMIT} levels; refusing it"


def read_json(path: Path, label: str, *, required: bool) -> dict:
    """A model's small JSON file as an object, within `size_limit` and JSON_DEPTH_LIMIT."""
    if not path.exists():
        if required:
            raise ModelError(f"model {label}: {path.name} is missing")
        return {}
    value = parse_json(read_small(path, f"model {label}"), f"model {label}", str(path))
    if not isinstance(value, dict):
        raise ModelError(f"model {label}: {path} is not a JSON object")
    return value


def drop_remote_code(config: dict, file: str) -> tuple[dict, list[str]]:
    """A copy of a config without remote-code pointers, at any depth (a vision-language model's sub-configs too),
    and what was dropped as "file: key": a merge never sends its users to someone else's code."""
    dropped: list[str] = []

    def clean(value: dict, prefix: str) -> dict:
        kept = {}
        for key, item in value.items():
            if key in REMOTE_CODE_KEYS:
                dropped.append(f"{file}: {prefix}{key}")
            else:
                shown = UNSHOWN.sub("?", str(key))  # an upstream key, shown in the model card
                kept[key] = clean(item, f"{prefix}{shown}.") if isinstance(item, dict) else item
        return kept

    return clean(config, ""), dropped


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: Path, data: bytes) -> None:
    """Write so that a crash leaves either the old or the new file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: object) -> None:
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


class FileHashes:
    """sha256 of local input files, remembered by (path, size, mtime, inode) so each file is hashed once."""

    def __init__(self, cache_dir: Path) -> None:
        self._path = cache_dir / "file-hashes.json"
        try:
            self._known: dict[str, str] = json.loads(self._path.read_text())
        except (OSError, ValueError):
            self._known = {}

    def sha256(self, path: Path) -> str:
        """The file's sha256; a blob of the HF cache is not taken for what its name says (another tool, or an
        endpoint it trusted, may have written it): it is hashed once like any file."""
        key = self._key(path)
        if key not in self._known:
            digest = hashlib.sha256()
            with path.resolve().open("rb") as handle:
                while chunk := handle.read(8 << 20):
                    digest.update(chunk)
            self.remember(path, digest.hexdigest())
        return self._known[key]

    def remember(self, path: Path, sha256: str) -> None:
        """Record a sha256 computed elsewhere (while downloading the file)."""
        self._known[self._key(path)] = sha256
        self._path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._path, self._known)

    @staticmethod
    def _key(path: Path) -> str:
        real = path.resolve()
        stat = real.stat()
        return f"{real}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"


def default_cache_dir() -> Path:
    """Where mergebot keeps its own small caches: $MERGEBOT_CACHE_DIR, else ~/.cache/mergebot."""
    configured = os.environ.get("MERGEBOT_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergebot"


def local_identity(path: Path) -> str:
    """A local checkpoint directory's identity: a digest of the sha256 of every file a merge reads, so it changes
    exactly when the merge's inputs change (hashes are remembered by file stat, so only changed files are read)."""
    if not path.is_dir():
        raise ModelError(f"model {path}: is not a directory")
    hashes = FileHashes(default_cache_dir())
    files = sorted(p for p in path.iterdir() if p.is_file() and is_merge_input(p.name))
    listing = [(file.name, hashes.sha256(file)) for file in files]
    return "local:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def short_identity(identity: str) -> str:
    """An identity as people read it in a message: a commit sha or a local digest, cut to 12 characters."""
    return identity.removeprefix("local:")[:12]
