"""The daemon's two Hub clients: upstream repos are read through `read_endpoint` (often a mirror), merges are
published, and the published repos read back, through `hub_endpoint`. The publish token (HF_TOKEN) goes to the read
endpoint only when it is the same endpoint, so a mirror never sees it."""

import os
from typing import Literal

from mergebot.config.daemon import DaemonSettings
from mergebot.hub.client import HubClient, RetryPolicy, endpoint_url


def publisher(settings: DaemonSettings, retry: RetryPolicy | None = None) -> HubClient:
    """Creates the repos, commits, and reads the published revision a commit builds on."""
    return HubClient(endpoint=settings.hub_endpoint, retry=retry)


def reader(settings: DaemonSettings, retry: RetryPolicy | None = None) -> HubClient:
    """Resolves, lists and downloads the upstream repos a merge reads."""
    read = endpoint_url(settings.read_endpoint or settings.hub_endpoint)
    token: str | Literal[False] | None = None if read == endpoint_url(settings.hub_endpoint) else False
    if settings.read_token_env:
        token = os.environ.get(settings.read_token_env) or False
    return HubClient(endpoint=read, token=token, retry=retry)
