"""Targets that read other targets' merges: `model = "target:NAME"` (anywhere a model is named) reads the merged
directory of target NAME in the state directory, known by its content like any local input, so a target re-runs
when the merge it reads changed and never because the other target merely ran.

A target may read another's *published* repo instead (`model = "me/first-stage"`), through the Hub like any repo;
`target:NAME` saves the round trip and works before anything is published. The daemon lets a target run only when
each target it reads has a merge in place that passed (see `mergebot.daemon.stages`).
"""

from collections.abc import Iterable
from pathlib import Path

from mergebot.config.document import Located
from mergebot.config.merge import MergeConfig
from mergebot.config.models import TARGET_PREFIX, Checkpoint, Names
from mergebot.config.moe import MoeConfig


def merged_dir(state_dir: Path, target: str) -> Path:
    """Where a target's merge is made and kept between runs."""
    return state_dir / "targets" / target / "merged"


def target_names(state_dir: Path, targets: Iterable[str]) -> Names:
    """`target:NAME` → target NAME's merged directory, for every target of the config."""
    known = sorted(targets)

    def resolve(name: str) -> Checkpoint | None:
        if not name.startswith(TARGET_PREFIX):
            return None
        target = name.removeprefix(TARGET_PREFIX)
        if target not in known:
            raise ValueError(f"{name!r}: no target is named {target!r} (targets: {', '.join(known) or 'none'})")
        return Checkpoint(name, path=merged_dir(state_dir, target))

    return resolve


def reads(merge: MergeConfig | MoeConfig) -> tuple[str, ...]:
    """The targets whose merges `merge` reads."""
    named = {c.name for spec in merge.models for c in spec.checkpoints if c.name.startswith(TARGET_PREFIX)}
    return tuple(sorted(name.removeprefix(TARGET_PREFIX) for name in named))


def upstream_first(upstreams: dict[str, tuple[str, ...]], index: dict[str, int], located: Located) -> list[str]:
    """The targets in config order, except that each comes after the targets it reads (so one check of every
    target sees an upstream's change before its readers); a cycle is refused at the name of a target on it."""
    ordered: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        if name in visiting:
            cycle = " → ".join([*visiting[visiting.index(name) :], name])
            raise located.error(f"targets[{index[name]}].name", f"its merge reads itself: {cycle}")
        visiting.append(name)
        for upstream in upstreams[name]:
            if upstream in upstreams:  # a target with a problem of its own is left out
                visit(upstream)
        visiting.pop()
        ordered.append(name)

    for name in sorted(upstreams, key=index.__getitem__):
        visit(name)
    return ordered
