"""How a merge names its input models: one string per model, as in mergekit.

A local checkpoint directory or a Hub repo id, each with an optional `@revision`; optionally mergekit's
`base+adapter`, a LoRA adapter applied to the base's weights (`org/base+org/lora`, each part with its own
`@revision`). A config read beside others may also name checkpoints in its own terms (an earlier stage of a
multi-stage merge, another daemon target as `target:NAME`): the `names` a caller passes.
"""

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebot.config.document import Located

REPO_ID = re.compile(r"(?!.*\.\.)(?![.-])[\w.-]+(/(?![.-])[\w.-]+)?")
"""What a Hub repo id can be: `name` or `org/name` (letters, digits, '_', '.', '-'; no '..')."""
TARGET_PREFIX = "target:"
"""`target:NAME` names another daemon target's merged output."""
Names = Callable[[str], "Checkpoint | None"]
"""A checkpoint named in the config's own terms → the checkpoint it stands for; None for a repo id or path. Raises
ValueError saying what is wrong with a name it knows to be wrong (a later stage, an unknown target)."""


@dataclass(frozen=True)
class Checkpoint:
    """Where one set of files comes from: a Hub repo id at an optional revision, or a local directory."""

    name: str
    revision: str | None = None
    path: Path | None = None
    """The directory a named checkpoint (an earlier stage's output, another target's merge) stands for."""

    @property
    def is_local(self) -> bool:
        """A checkpoint directory on this machine rather than a Hub repo id: the one place this is decided."""
        return self.path is not None or Path(self.name).expanduser().is_dir()

    @property
    def local_path(self) -> Path:
        return self.path or Path(self.name).expanduser()

    def reference(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name


@dataclass(frozen=True)
class ModelSpec:
    """One input model: a local directory or a Hub repo id, with an optional revision and its own parameters, and
    optionally a LoRA adapter applied to its weights (then `model` is mergekit's `base+adapter` name)."""

    model: str
    revision: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None
    """For a named checkpoint (see `Checkpoint.path`)."""
    lora: Checkpoint | None = None

    @property
    def base(self) -> Checkpoint:
        """The checkpoint whose weights this input reads (before its adapter, if any)."""
        name = self.model.removesuffix(f"+{self.lora.name}") if self.lora else self.model
        return Checkpoint(name, self.revision, self.path)

    @property
    def checkpoints(self) -> tuple[Checkpoint, ...]:
        """Everything this input reads files from: its base, then its adapter."""
        return (self.base, self.lora) if self.lora else (self.base,)

    @property
    def is_local(self) -> bool:
        return self.base.is_local

    def reference(self) -> str:
        """The input as mergekit writes it, revisions inline: `org/base@sha+org/lora@sha`."""
        return "+".join(checkpoint.reference() for checkpoint in self.checkpoints)


Reference = Callable[[Any, str], ModelSpec | None]
"""A model string at a key path → the input it names (without parameters); None for a missing value."""


def parse_reference(value: Any, located: Located, where: str, names: Names | None) -> ModelSpec | None:
    """`path`, `org/name`, `org/name@revision`, a name `names` knows, or mergekit's `base+adapter` of two of these."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise located.error(where, "must be a model path or repo id")
    parts = [value] if Path(value).exists() else value.split("+")
    if len(parts) > 2 or not all(parts):
        raise located.error(where, f"{value!r}: mergekit's model+LoRA form is base+adapter, one adapter")
    checkpoints = []
    for part in parts:
        try:
            named = names(part) if names else None
            if named is None and part.startswith(TARGET_PREFIX):
                raise ValueError(f"{part!r} names another target's merge: only in a daemon config (`mergebot run`)")
        except ValueError as problem:
            raise located.error(where, str(problem), value=part) from None
        if named is None and "@" in part and not Path(part).exists():
            name, _, revision = part.rpartition("@")
            named = Checkpoint(name, revision)
        checkpoint = named or Checkpoint(part)
        if checkpoint.path is None and not checkpoint.is_local and not REPO_ID.fullmatch(checkpoint.name):
            raise located.error(where, f"no directory {checkpoint.name} here, and it cannot be a Hub repo id", part)
        checkpoints.append(checkpoint)
    base, lora = checkpoints[0], checkpoints[1] if len(checkpoints) > 1 else None
    model = f"{base.name}+{lora.name}" if lora else base.name
    return ModelSpec(model, base.revision, path=base.path, lora=lora)
