"""Requests and responses as the devhub's routes see them, apart from the socket handling in `server`.

A route reads a `Request` and returns a `Response` or raises `HubError`; `error_response` turns that error into what
the Hub answers, with the `X-Error-Code` header the client maps to its exceptions.
"""

import html
import json
import re
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from mergebot.dev.devhub.store import HubError


class Body:
    """A request body read on demand, plain or chunked, so multi-GB LFS uploads stream to disk."""

    def __init__(self, rfile: BinaryIO, headers: Message) -> None:
        self._rfile = rfile
        self._chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._left = 0 if self._chunked else int(headers.get("Content-Length") or 0)
        self._done = not self._chunked and self._left == 0

    def read(self, size: int) -> bytes:
        """Up to `size` bytes; b"" once the body is consumed."""
        if self._done:
            return b""
        if self._chunked and self._left == 0:
            self._left = int(self._rfile.readline().split(b";")[0], 16)
            if self._left == 0:
                while self._rfile.readline().strip():  # trailers, up to the blank line
                    pass
                self._done = True
                return b""
        data = self._rfile.read(min(size, self._left))
        if not data:
            raise ConnectionError("client closed the connection mid-body")
        self._left -= len(data)
        if self._left == 0:
            if self._chunked:
                self._rfile.readline()  # the CRLF closing the chunk
            else:
                self._done = True
        return data

    def read_all(self) -> bytes:
        return b"".join(iter(lambda: self.read(1 << 20), b""))

    def drain(self) -> None:
        """Consume what the route did not read, so the next request on this connection parses."""
        while self.read(1 << 20):
            pass


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: Body
    base_url: str
    params: dict[str, str] = field(default_factory=dict)
    token: str | None = None

    def json(self) -> Any:
        return json.loads(self.body.read_all() or b"{}")

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None  # sent instead of `body`: `length` bytes from `start`
    start: int = 0
    length: int = 0
    counted: tuple[str, str] | None = None  # (repo, path) whose served bytes go to the stats
    padding: int = 0  # bytes sent after the body, beyond what the file holds (a hostile Hub's oversize body)


def json_response(status: int, data: Any, content_type: str = "application/json") -> Response:
    return Response(status, {"Content-Type": content_type}, json.dumps(data).encode())


def tree_page(repo_id: str, commit: str, files: list[tuple[str, int]], prefix: str) -> Response:
    """What a person's browser gets at `/{repo}/tree/{rev}`, as on the Hub: the revision's files, each a link to
    its content under `prefix` (`/{repo}/resolve/{commit}`)."""
    rows = "".join(
        f'<li><a href="{html.escape(prefix)}/{html.escape(quote(path))}">{html.escape(path)}</a> ({size:,} bytes)</li>'
        for path, size in files
    )
    title = html.escape(f"{repo_id} at {commit}")
    body = f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>'
    body += f"<body><h1>{title}</h1><ul>{rows}</ul></body></html>\n"
    return Response(200, {"Content-Type": "text/html; charset=utf-8"}, body.encode())


def error_response(err: HubError) -> Response:
    response = json_response(err.status, {"error": err.message})
    # Messages quote file names; JSON escaping keeps the header ASCII and on one line.
    response.headers |= err.headers | {"X-Error-Message": json.dumps(err.message)[1:-1]}
    if err.code:
        response.headers["X-Error-Code"] = err.code
    return response


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, length) of a single `bytes=` range, None for the whole file; 416 when it is unsatisfiable."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if match is None or match[1] == match[2] == "":
        return None  # absent, malformed or multi-range: serve the whole file, as HTTP allows
    if match[1]:
        start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
    else:
        start, end = max(size - int(match[2]), 0), size - 1
    if start >= size or start > end:
        raise HubError(416, f"Range {header} not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end - start + 1


def bearer_token(headers: Message, tokens: frozenset[str] | None) -> str | None:
    """The request's token; a malformed or (when `tokens` is set) unknown one is refused outright, like the Hub."""
    auth = headers.get("Authorization")
    if auth is None:
        return None
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token or (tokens is not None and token not in tokens):
        raise HubError(401, "Invalid credentials in Authorization header")
    return token
