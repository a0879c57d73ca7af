"""One run's record: what the merge child writes, the daemon stores, and `status`, the notifications, the metrics,
the regression check and the demo read. Typed and versioned, and turned into text and back by one pair of
functions (`to_json`, `from_json`), so that no reader picks keys out of a dict.

Below both the pipeline (which writes it) and the daemon (which reads it), which may not import each other. A row
written before the record had a version (the child's plain dict, the gate's figures at its top) still reads.
"""

import json
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, TypedDict

from mergebot.errors import StateError

VERSION = 2
"""1: the child's dict as it was (no `version` key); 2: this record."""
RUN_TRAILER = "Mergebot-Run"
"""The line in the description of a commit mergebot publishes that names the daemon's run (`Mergebot-Run: 12`),
so that a publish whose record was lost (kill -9 between the commit and the state) is recognised on restart."""


class Outcome(StrEnum):
    """How a run ended (a run not yet ended is "running" in the state)."""

    PUBLISHED = "published"
    UNCHANGED = "unchanged"
    """The merge passed and the repo already held exactly it: nothing was uploaded."""
    FAILED = "failed"
    """The gate refused the merge, an input or the config is bad, or (transient) the Hub or the machine failed."""
    HELD = "held"
    """The regression check against the last publish refused the merge; nothing was uploaded."""
    INTERRUPTED = "interrupted"
    INTERNAL_ERROR = "internal_error"
    """An unexpected exception in the merge child (a bug): retried with backoff like a transient failure."""


SUCCESSFUL = (Outcome.PUBLISHED, Outcome.UNCHANGED)
REFUSED = (Outcome.FAILED, Outcome.HELD)


class Figures(TypedDict, total=False):
    """The gate's figures. Open: a check adds its own keys here (they are stored and read back as they are)."""

    merge_ppl: float | None
    parent_ppl: dict[str, float | None]
    kl: dict[str, float]
    stop_rate: float | None
    """The share of the behaviour probe's prompts the merge ended its turn on (None: not probed)."""
    eot_prob: float | None
    """The merge's mean end-of-turn probability after the probe's reference answers."""
    parent_stop_rate: dict[str, float | None]
    input_facts: dict[str, dict[str, str]]
    """Per input: its chat template digest, end-of-turn ids and numerics config (`mergebot.pipeline.facts`)."""


class GgufResult(TypedDict, total=False):
    """One GGUF file of a run: what was made, what its checks measured, and whether it went out."""

    file: str
    """Its name in the repo (`NAME-Q8_0.gguf`)."""
    repo: str
    size: int
    sha256: str
    perplexity: float | None
    """On the eval text, read by llama.cpp; beside the merge's own (`Figures.merge_ppl`)."""
    stop_rate: float | None
    """The share of the probe's prompts it ended its turn on."""
    passed: bool
    reason: str | None
    """Why it was not published (a failed check, a refused architecture, a failed commit)."""
    checked: str
    """What its checks found, for a file that passed (one line)."""
    published: bool
    """In the repo's head after this run."""
    reused: bool
    """Made by an earlier run from the same merged files: not converted again."""


@dataclass
class RunRecord:
    """What a run did and read."""

    outcome: Outcome = Outcome.FAILED
    reason: str | None = None
    culprit: str | None = None
    """The input blamed for a failed or held run, when one is."""
    inputs: dict[str, str] = field(default_factory=dict)
    """model -> the commit sha merged (`+` its adapter's), or a local directory's identity: the pinned inputs."""
    digests: dict[str, str] = field(default_factory=dict)
    """model -> a digest of the files a merge reads from it: what decides whether the target is due."""
    published_sha: str | None = None
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)
    """Output shard -> its fingerprint."""
    uploaded: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0
    """Fetched from the Hub by this run (files the cache did not hold yet)."""
    uploaded_bytes: int = 0
    figures: Figures = field(default_factory=lambda: Figures())
    seconds: float = 0.0
    node: str | None = None
    """The Ray node the run ran on (None beside the daemon)."""
    gave_up: bool = False
    """A transient failure after which the daemon stopped retrying."""
    gguf: dict[str, GgufResult] = field(default_factory=dict)
    """GGUF type (`Q8_0`) -> its file and checks, for a target that asks for GGUF files."""


_FIELDS = {f.name for f in fields(RunRecord)}
_OPTIONAL = {"reason", "culprit", "published_sha", "node"}
_TYPES: dict[str, type | tuple[type, ...]] = {
    "inputs": dict, "digests": dict, "fingerprints": dict, "figures": dict, "computed": list, "reused": list,
    "uploaded": list, "downloaded_bytes": int, "uploaded_bytes": int, "seconds": (int, float), "gave_up": bool,
    "gguf": dict,
}  # fmt: skip
_FIGURES_V1 = ("merge_ppl", "parent_ppl", "kl")


def to_json(record: RunRecord) -> str:
    return json.dumps(asdict(record) | {"version": VERSION}, sort_keys=True)


def from_json(text: str | bytes) -> RunRecord:
    """A record from `to_json`'s text, or from a version 1 row; keys it does not know are left out."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise StateError(f"a run record is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise StateError("a run record must be a JSON object")
    version = data.pop("version", 1)
    if version == 1:
        data = _from_v1(data)
    elif version != VERSION:
        raise StateError(f"a run record of version {version!r}; this mergebot reads versions 1 to {VERSION}")
    known = {key: value for key, value in data.items() if key in _FIELDS}
    for key, value in known.items():
        expected = str if key in _OPTIONAL else _TYPES.get(key, object)
        if not isinstance(value, expected) and not (value is None and key in _OPTIONAL):
            raise StateError(f"a run record's {key} holds a bad value: {value!r:.80}")
    if not all(isinstance(result, dict) for result in known.get("gguf", {}).values()):
        raise StateError("a run record's gguf holds a result that is not an object")
    try:
        known["outcome"] = Outcome(known.get("outcome", Outcome.FAILED))
        return RunRecord(**known)
    except (TypeError, ValueError) as error:
        raise StateError(f"a run record holds a bad value: {error}") from None


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """The child's dict before version 2: the figures at the top, the Ray node as `ray_node`."""
    figures = {key: data.pop(key) for key in _FIGURES_V1 if key in data}
    node = data.pop("ray_node", None)
    return data | {"figures": figures, "node": node}
