"""Parent perplexities remembered in the state database, for the daemon's merge child: a revision's weights never
change, so each parent is measured once per eval text and window settings."""

from dataclasses import dataclass

from mergebot import log
from mergebot.daemon.state import State
from mergebot.errors import StateError


@dataclass(frozen=True)
class StatePerplexityCache:
    """The pipeline's PerplexityCache (mergebot.pipeline.perplexity) in the state's parent_perplexity table. The
    cache is an optimisation, so a database error is logged and counts as a miss (get) or is dropped (put), never
    failing the run."""

    state: State

    def get(self, name: str, revision: str, measure: str) -> float | None:
        try:
            return self.state.parent_perplexity(name, revision, measure)
        except StateError as error:
            log.get("state").warning("parent perplexity cache unreadable", error=str(error))
            return None

    def put(self, name: str, revision: str, measure: str, ppl: float) -> None:
        try:
            self.state.record_parent_perplexity(name, revision, measure, ppl)
        except StateError as error:
            log.get("state").warning("parent perplexity not cached", error=str(error))
