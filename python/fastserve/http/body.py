"""Reading request bodies within bounds: size (also after decompression) and time."""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

from fastserve.errors import (
    ClientDisconnected,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def read_body(request: web.BaseRequest, *, limit: int, timeout_s: float) -> bytes:
    """The whole body, decompressed; 413 past ``limit``, 408 when slower than ``timeout_s``."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(limit)
    content = request.content
    try:
        if content.is_eof():
            body = await request.read()  # already buffered whole: nothing to wait for
        else:
            body = await asyncio.wait_for(request.read(), timeout_s)
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(limit) from None
    except asyncio.TimeoutError:
        raise RequestTimeout(f"request body not received within {timeout_s:g} s") from None
    except ConnectionError:
        raise ClientDisconnected from None
    encoding = request.headers.get("Content-Encoding")
    if encoding:
        body = decompress(body, encoding.strip().lower(), limit)
    return body


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Inflate a gzip or deflate body without ever holding more than ``limit`` + 1 bytes of it."""
    if encoding == "identity":
        return body
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise UnsupportedMediaType(
            f"unsupported Content-Encoding '{encoding[:40]}' (use gzip, deflate or identity)"
        )
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise InvalidRequest(f"body is not valid {encoding} data") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(limit)
    if not inflater.eof:
        raise InvalidRequest(f"{encoding} body is truncated")
    return out
