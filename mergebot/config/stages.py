"""Multi-stage merges, as mergekit-multimerge reads them: one YAML file of several documents, each a merge with a
`name`, where a later stage names an earlier one as a model (`model: first-stage`, `base_model: first-stage`,
`first-stage+org/lora`, ...).

Stages run in the order written; the last one (which alone may be unnamed: mergekit's final merge) is the output,
and every other stage's output is kept in a hidden directory beside it, `.OUT_DIR.stages/NAME`, where a rerun reuses
its shards like any output's, so only what changed is recomputed. A stage name that is not an earlier stage's, a
local directory or an `org/name` repo id is a mistake (a typo, or a stage written later), refused with its line.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from mergebot.config.document import Located, read_config_text, read_document
from mergebot.config.merge import MergeConfig, parse_merge
from mergebot.config.models import Checkpoint, Names
from mergebot.errors import ConfigError, ConfigErrors, MergebotError

NAME_KEY = "name"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DOCUMENT_START = re.compile(r"---(\s|$)")


@dataclass(frozen=True)
class Stage:
    name: str | None
    merge: MergeConfig
    out_dir: Path


def stages_dir(out_dir: Path) -> Path:
    """Where the stages before the last keep their outputs: hidden, beside OUT_DIR."""
    out_dir = out_dir.absolute()
    return out_dir.parent / f".{out_dir.name}.stages"


def load_stages(path: Path, out_dir: Path) -> list[Stage] | None:
    """The stages of a multi-stage merge file, in order, the last one writing `out_dir`; None for a file that
    holds one plain merge (no `name`)."""
    if path.suffix.lower() not in (".yml", ".yaml"):
        return None
    try:
        text = read_config_text(path)
    except MergebotError:
        return None  # read_document reports it when the file is read as a plain merge
    documents = _documents(path, text)
    if not documents or (len(documents) == 1 and NAME_KEY not in documents[0][0]):
        return None
    declared = _declared_names(documents)
    stages: list[Stage] = []
    earlier: dict[str | None, Path] = {}
    problems: list[ConfigError] = []
    warnings: list[str] = []
    for index, (raw, located, _) in enumerate(documents):
        name = declared[index]
        last = index == len(documents) - 1
        out = out_dir if last else stages_dir(out_dir) / str(name)
        names = _names(name, dict(earlier), declared)
        earlier[name] = out  # even when this stage has a problem, so a later one reading it reports only its own
        try:
            merge = parse_merge({k: v for k, v in raw.items() if k != NAME_KEY}, located, names=names)
        except ConfigErrors as error:  # every stage's problems at once
            problems += error.problems
            warnings += error.warnings
            continue
        stages.append(Stage(name, merge, out))
    if problems:
        raise ConfigErrors(problems, tuple(warnings) + tuple(w for stage in stages for w in stage.merge.warnings))
    return stages


def _documents(path: Path, text: str) -> list[tuple[dict, Located, int]]:
    """Each YAML document of the file, read on its own but keeping its line numbers (the lines of the other
    documents blanked), so an error points at the right line and a key is looked for in its own document; with
    the line its content starts on."""
    lines = text.splitlines()
    starts = sorted({0} | {n for n, line in enumerate(lines) if DOCUMENT_START.match(line)})
    documents = []
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        chunk = lines[start:end]
        content = [line for line in chunk if line.strip() and not line.lstrip().startswith("#")]
        if all(DOCUMENT_START.match(line) and not line[3:].strip() for line in content):
            continue  # nothing but a document marker (and comments)
        first = start + chunk.index(next((line for line in content if not DOCUMENT_START.match(line)), content[0])) + 1
        documents.append((*read_document(path, "\n" * start + "\n".join(chunk) + "\n"), first))
    return documents


def _declared_names(documents: list[tuple[dict, Located, int]]) -> list[str | None]:
    """Each document's stage name, checked: names a directory can have, each once; only the last may lack one."""
    names: list[str | None] = []
    for index, (raw, located, first) in enumerate(documents):
        name = raw.get(NAME_KEY)
        if name is None and index < len(documents) - 1:
            raise ConfigError(
                f"{located.path}:{first}: {NAME_KEY}: required: only the last stage may be unnamed (the others are "
                "named to be read)"
            )
        if name is not None and not (isinstance(name, str) and NAME.fullmatch(name)):
            raise located.error(NAME_KEY, f"{name!r}: a stage name is letters, digits, '.', '_' or '-'")
        if name is not None and name in names:
            raise located.error(NAME_KEY, f"{name!r} names two stages")
        names.append(name)
    return names


def _names(current: str | None, earlier: dict[str | None, Path], declared: list[str | None]) -> Names:
    """How a stage's model names resolve: an earlier stage → its output directory."""

    def resolve(name: str) -> Checkpoint | None:
        if name in earlier:
            path = earlier[name]
            return Checkpoint(str(path), path=path)
        if name == current:
            raise ValueError(f"{name!r} is this stage: a stage cannot read its own output")
        if name in declared:
            raise ValueError(f"{name!r} is a later stage: stages run in the order written, so write it first")
        repo = name.rpartition("@")[0] if "@" in name else name
        if "/" not in repo and not Path(repo).expanduser().exists():
            known = ", ".join(str(n) for n in earlier) or "none"
            raise ValueError(
                f"{name!r} is not an earlier stage (earlier: {known}), a local directory or an org/name repo id"
            )
        return None

    return resolve
