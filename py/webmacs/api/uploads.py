"""File uploads (OTA bundles, plugin wheels) streamed out of a multipart body: the HTTP side only.

The services get a file name and the file's bytes as they arrive, so they write to disk under their own caps and
never see a request; nothing is spooled whole first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from python_multipart.multipart import MultipartParser, parse_options_header

from webmacs.errors import Unprocessable


def missing_file(field: str = "file") -> RequestValidationError:
    """FastAPI's own 422 for a missing form field, as WebMACS answers it."""
    return RequestValidationError([{"type": "missing", "loc": ("body", field), "msg": "Field required", "input": None}])


@dataclass
class StreamedFile:
    filename: str
    #: The part's bytes as the client sends them. Raises `missing_file()` if the body ends inside the part.
    chunks: AsyncIterator[bytes]


async def streamed_file(request: Request, field: str = "file") -> StreamedFile:
    """The first part named `field` that carries a file name. Reads the body up to that part's headers; the rest
    is read as `chunks` is consumed. Raises `missing_file()` when the body has no such part."""
    kind, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise missing_file(field)
    parts = _file_part(request, boundary, field.encode())
    first = await anext(parts, None)
    if not isinstance(first, str):
        raise missing_file(field)
    return StreamedFile(first, _data(parts, field))


async def _data(parts: AsyncIterator[str | bytes], field: str) -> AsyncIterator[bytes]:
    async for piece in parts:
        assert isinstance(piece, bytes)  # after the file name, only data
        yield piece


async def _file_part(request: Request, boundary: bytes, field: bytes) -> AsyncIterator[str | bytes]:
    """Yields the file name, then the part's data chunks; raises `missing_file()` if the part never ends."""
    events: list[tuple[str, bytes]] = []
    header: dict[str, bytes] = {"field": b"", "value": b"", "disposition": b""}

    def on_header_end() -> None:
        if header["field"].lower() == b"content-disposition":
            header["disposition"] = header["value"]
        header["field"] = header["value"] = b""

    def on_headers_finished() -> None:
        events.append(("headers", header["disposition"]))
        header["disposition"] = b""

    callbacks: Any = {
        "on_header_field": lambda d, s, e: header.__setitem__("field", header["field"] + d[s:e]),
        "on_header_value": lambda d, s, e: header.__setitem__("value", header["value"] + d[s:e]),
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": lambda d, s, e: events.append(("data", bytes(d[s:e]))),
        "on_part_end": lambda: events.append(("end", b"")),
    }
    parser = MultipartParser(boundary, callbacks)
    inside = done = False
    async for chunk in request.stream():
        if done:
            continue  # the rest of the body is read (and dropped) so the connection stays usable
        try:
            parser.write(chunk)
        except Exception as e:  # python-multipart raises its own error types on malformed input
            raise Unprocessable("Invalid multipart body.") from e
        for kind, data in events:
            if done:
                break
            if kind == "headers" and not inside:
                _, opts = parse_options_header(data)
                if opts.get(b"name") == field and b"filename" in opts:
                    inside = True
                    yield opts[b"filename"].decode("utf-8", "replace")
            elif kind == "data" and inside and data:
                yield data
            elif kind == "end" and inside:
                done = True
        events.clear()
    if not done:
        raise missing_file(field.decode())
