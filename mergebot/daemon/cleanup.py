"""Cache hygiene: the Hub cache keeps every upstream revision ever fetched; the daemon drops those no one needs."""

from mergebot.config.daemon import DaemonConfig
from mergebot.daemon.state import State
from mergebot.hub.cache import clean_cache
from mergebot.hub.client import HubClient


def clean_unused_revisions(config: DaemonConfig, state: State) -> tuple[int, int]:
    """Drop cached upstream revisions that no target reads now and no last published merge used.

    Returns (revisions removed, bytes freed); repos that no target reads are left alone."""
    hub = HubClient(endpoint=config.daemon.hub_endpoint)
    specs = [spec for target in config.targets.values() for spec in target.merge.models]
    checkpoints = [checkpoint for spec in specs for checkpoint in spec.checkpoints if not checkpoint.is_local]
    repos = {checkpoint.name for checkpoint in checkpoints}
    published = state.published_inputs()
    keep = published | {
        (c.name, sha) for c in checkpoints if (sha := state.latest_revision(c.name, c.revision or "main"))
    }
    for spec in (spec for spec in specs if spec.lora):  # recorded as "base sha+adapter sha" under the input's name
        for model, shas in published:
            if model == spec.model:
                keep |= set(zip((c.name for c in spec.checkpoints), shas.split("+"), strict=False))
    return clean_cache(hub.cache_dir, repos, keep)
