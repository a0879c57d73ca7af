"""Cache hygiene: the Hub cache keeps every upstream revision ever fetched; the daemon drops those no one needs."""

from mergebot.config.daemon import DaemonConfig
from mergebot.daemon.state import State
from mergebot.hub.cache import clean_cache
from mergebot.hub.client import HubClient


def clean_unused_revisions(config: DaemonConfig, state: State) -> tuple[int, int]:
    """Drop cached upstream revisions that no target reads now and no last published merge used.

    Returns (revisions removed, bytes freed); repos that no target reads are left alone."""
    hub = HubClient(endpoint=config.daemon.hub_endpoint)
    specs = [spec for target in config.targets.values() for spec in target.merge.models if not spec.is_local]
    repos = {spec.model for spec in specs}
    keep = state.published_inputs() | {
        (spec.model, sha) for spec in specs if (sha := state.latest_revision(spec.model, spec.revision or "main"))
    }
    return clean_cache(hub.cache_dir, repos, keep)
