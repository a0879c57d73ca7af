"""A hostile Hub, for tests: the devhub answering a request as a malicious endpoint or mirror would.

Each kind rewrites what the route answered, so everything else stays a working Hub: "etag" sends `value` as the
download's ETag and X-Linked-Etag, "commit" as its X-Repo-Commit and as the `sha` of model_info, "oid" and
"lfs_oid" as every tree entry's git blob id or LFS sha256, "redirect" answers 302 to `value`, and "oversize" sends
`extra` bytes more than the file (and than the listing says).
"""

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from mergebot.dev.devhub.messages import Response

HostileKind = Literal["etag", "commit", "oid", "lfs_oid", "redirect", "oversize"]
HOSTILE_KINDS: tuple[HostileKind, ...] = ("etag", "commit", "oid", "lfs_oid", "redirect", "oversize")


def tamper(kind: str, response: Response, value: str, extra: int) -> Response:
    """The route's response as the hostile endpoint sends it."""
    headers = dict(response.headers)
    if kind == "etag":
        for name in ("ETag", "X-Linked-Etag"):
            headers[name] = f'"{value}"'
        return replace(response, headers=headers)
    if kind == "commit":
        headers["X-Repo-Commit"] = value
        return replace(response, headers=headers, body=_rewrite_json(response.body, lambda data: _set_sha(data, value)))
    if kind in ("oid", "lfs_oid"):
        return replace(response, body=_rewrite_json(response.body, lambda data: _set_oids(data, kind, value)))
    if kind == "redirect":
        return Response(302, {"Location": value})
    if kind == "oversize":
        return replace(response, padding=extra)
    return response


def _rewrite_json(body: bytes, change: Callable[[object], object]) -> bytes:
    if not body:
        return body
    return json.dumps(change(json.loads(body))).encode()


def _set_sha(data: object, value: str) -> object:
    if isinstance(data, dict) and "sha" in data:
        data["sha"] = value
    return data


def _set_oids(data: object, kind: str, value: str) -> object:
    for entry in data if isinstance(data, list) else ():
        if kind == "oid" and "oid" in entry:
            entry["oid"] = value
        if kind == "lfs_oid" and "lfs" in entry:
            entry["lfs"]["oid"] = value
    return data
