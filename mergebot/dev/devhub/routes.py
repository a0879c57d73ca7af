"""The route table: which handler answers each URL the huggingface_hub client requests.

Route kinds (the handler names) are what stats count and what faults match.
"""

import re
from collections.abc import Callable
from urllib.parse import unquote

from mergebot.dev.devhub.api import HubApi
from mergebot.dev.devhub.messages import Request, Response
from mergebot.dev.devhub.store import HubError
from mergebot.dev.devhub.xet import XET_ROUTES

_TYPE = r"(?:(?P<type>models|datasets|spaces)/)"
_API_REPO = rf"/api/{_TYPE}(?P<ns>[^/]+)/(?P<name>[^/]+)"
_GIT_REPO = rf"/{_TYPE}?(?P<ns>[^/]+)/(?P<name>[^/]+?)\.git/info/lfs/objects"
_FILE = rf"/{_TYPE}?(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"
Handler = Callable[[HubApi, Request], Response]
_ROUTES: list[tuple[tuple[str, ...], re.Pattern[str], str, Handler]] = [
    (methods, re.compile(pattern), handler.__name__, handler)
    for methods, pattern, handler in [
        (("GET",), r"/api/whoami-v2", HubApi.whoami),
        (("POST",), r"/api/repos/create", HubApi.repo_create),
        (("DELETE",), r"/api/repos/delete", HubApi.repo_delete),
        (("POST",), r"/api/validate-yaml", HubApi.validate_yaml),
        (("GET",), rf"{_API_REPO}(?:/revision/(?P<rev>[^/]+))?", HubApi.repo_info),
        (("GET",), rf"{_API_REPO}/refs", HubApi.refs),
        (("GET",), rf"{_API_REPO}/commits/(?P<rev>[^/]+)", HubApi.commits),
        (("GET",), rf"{_API_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", HubApi.tree),
        (("POST",), rf"{_API_REPO}/paths-info/(?P<rev>[^/]+)", HubApi.paths_info),
        (("POST",), rf"{_API_REPO}/preupload/(?P<rev>[^/]+)", HubApi.preupload),
        (("POST",), rf"{_API_REPO}/commit/(?P<rev>[^/]+)", HubApi.commit),
        (("POST", "DELETE"), rf"{_API_REPO}/branch/(?P<rev>[^/]+)", HubApi.branch),
        (("POST", "DELETE"), rf"{_API_REPO}/tag/(?P<rev>[^/]+)", HubApi.tag),
        (("POST",), rf"{_GIT_REPO}/batch", HubApi.lfs_batch),
        (("PUT",), rf"{_GIT_REPO}/upload/(?P<oid>[0-9a-f]{{64}})", HubApi.lfs_upload),
        (("POST",), rf"{_GIT_REPO}/verify", HubApi.lfs_verify),
        (("GET", "HEAD"), _FILE, HubApi.resolve),
        *[(methods, (_API_REPO if p.startswith("/xet-") else "") + p, handler) for methods, p, handler in XET_ROUTES],
        (("GET",), r"/(?P<ns>[^/]+)/(?P<name>[^/]+)/tree/(?P<rev>[^/]+)", HubApi.tree_html),
    ]
]
ROUTE_KINDS = frozenset(kind for _, _, kind, _ in _ROUTES) | {"unknown"}


def _not_found(api: HubApi, req: Request) -> Response:
    raise HubError(404, f"devhub has no route {req.method} {req.path}")


def route(method: str, path: str) -> tuple[str, Handler, dict[str, str]]:
    """The route kind, handler and URL-decoded path parameters (revisions and paths arrive percent-encoded)."""
    for methods, pattern, kind, handler in _ROUTES:
        if method in methods and (match := pattern.fullmatch(path)):
            return kind, handler, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
    return "unknown", _not_found, {}
