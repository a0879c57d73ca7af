"""A hostile Hub, for tests: the devhub answering a request as a malicious endpoint or mirror would.

Each kind rewrites what the route answered, so everything else stays a working Hub: "etag" sends `value` as the
download's ETag and X-Linked-Etag, "commit" as its X-Repo-Commit and as the `sha` of model_info, "oid" and
"lfs_oid" as every tree entry's git blob id or LFS sha256, "redirect" answers 302 to `value`, "oversize" sends
`extra` bytes more than the file (and than the listing says), and "garble" answers a file's bytes inverted, or each
term of a Xet reconstruction (and the ranges it names to fetch) pushed past the end of its xorb.
"""

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from mergebot.dev.devhub.messages import Response

HostileKind = Literal["etag", "commit", "oid", "lfs_oid", "redirect", "oversize", "garble"]
HOSTILE_KINDS: tuple[HostileKind, ...] = ("etag", "commit", "oid", "lfs_oid", "redirect", "oversize", "garble")


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
    if kind == "garble" and response.status < 300:
        return _garble(response)
    return response


def _garble(response: Response) -> Response:
    if response.file is not None:
        with response.file.open("rb") as f:
            f.seek(response.start)
            body = f.read(response.length).translate(bytes(range(255, -1, -1)))
        return Response(response.status, response.headers, body, counted=response.counted)
    data = json.loads(response.body or b"{}")
    for item in [*data.get("terms", []), *(e for v in data.get("fetch_info", {}).values() for e in v)]:
        item["range"]["end"] += 1000
    return Response(response.status, response.headers, json.dumps(data).encode())


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
