"""multipart/related, read and written as streams (PS3.18 section 8.6.1.2 / 8.7: RFC 2387 multipart/related
with RFC 2046 section 5.1.1 delimiters), so a series of any size passes through a bounded buffer.

`read_parts(chunks, boundary, open_part)` parses a body arriving as byte chunks: for each part it calls
`open_part(headers)` and hands the body to the returned sink's `write()`, then calls `finish()` once the
part's closing delimiter has been seen. A body that ends before the close delimiter ("--boundary--") is
truncated (a transient DicomwebError): the last part is never finished, so the caller never mistakes half an
instance for a whole one. Memory: one chunk plus the length of a delimiter.

`MultipartBody` is the writing side (STOW-RS, PS3.18 10.5): a file-like request body over files on disk,
read block by block, that knows its exact length (requests sends Content-Length, not chunked) and can be
rewound (urllib3 rewinds it before a retry).
"""
from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, Protocol

from fhirbridge.dicomweb.errors import DicomwebError

MAX_HEADER_BYTES = 16 * 1024      # a part's headers are a few lines; anything larger is not multipart
MAX_PADDING_BYTES = 1024          # RFC 2046 5.1.1 "transport-padding" after a delimiter: whitespace only
_BOUNDARY_RE = re.compile(r"""boundary\s*=\s*(?:"([^"]{1,70})"|([^;\s"]{1,70}))""", re.IGNORECASE)


class PartSink(Protocol):
    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a multipart Content-Type (RFC 2046 5.1.1: 1-70 characters)."""
    if not content_type.split(";")[0].strip().lower().startswith("multipart/"):
        raise DicomwebError(f"expected a multipart answer, got {content_type.split(';')[0].strip()[:60]!r}",
                            kind="not-dicom")
    match = _BOUNDARY_RE.search(content_type)
    if not match:
        raise DicomwebError("multipart answer without a boundary parameter", kind="not-dicom")
    return (match.group(1) or match.group(2)).encode("ascii", "replace")


def parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise DicomwebError("a multipart part has a malformed header line", kind="not-dicom")
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return headers


def read_parts(chunks: Iterable[bytes], boundary: bytes, open_part: Callable[[dict[str, str]], PartSink]) -> int:
    """Parse a multipart body from `chunks`; returns the number of parts finished (see module docstring)."""
    dash = b"--" + boundary
    body_end = b"\r\n" + dash        # the delimiter that ends a part's body: CRLF belongs to it (RFC 2046)
    keep = len(body_end) - 1         # bytes held back: a delimiter may straddle two chunks
    buf = bytearray()
    state = "preamble"
    sink: PartSink | None = None
    parts = 0
    for chunk in chunks:
        if not chunk:
            continue
        buf += chunk
        while True:
            if state == "preamble":
                # The first delimiter may open the body or follow a preamble's CRLF.
                at = buf.find(dash)
                if at < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise DicomwebError("multipart answer does not start with its boundary", kind="not-dicom")
                    break
                del buf[:at]
                state = "delimiter"
            elif state == "delimiter":
                # buf starts with "--boundary": "--" next closes the body, else padding and CRLF open a part.
                if len(buf) < len(dash) + 2:
                    break
                if buf[len(dash):len(dash) + 2] == b"--":
                    state = "done"
                    buf.clear()
                    break
                eol = buf.find(b"\r\n", len(dash))
                if eol < 0:
                    if len(buf) > len(dash) + MAX_PADDING_BYTES:
                        raise DicomwebError("multipart delimiter line is malformed", kind="not-dicom")
                    break
                if buf[len(dash):eol].strip(b" \t"):
                    raise DicomwebError("multipart delimiter line is malformed", kind="not-dicom")
                del buf[:eol + 2]
                state = "headers"
            elif state == "headers":
                if buf[:2] == b"\r\n":           # a part without headers
                    block, used = b"", 2
                else:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buf) > MAX_HEADER_BYTES:
                            raise DicomwebError("a multipart part's headers are too long", kind="not-dicom")
                        break
                    block, used = bytes(buf[:end]), end + 4
                del buf[:used]
                sink = open_part(parse_headers(block))
                state = "body"
            elif state == "body":
                assert sink is not None
                at = buf.find(body_end)
                if at < 0:
                    if len(buf) > keep:
                        sink.write(bytes(buf[:len(buf) - keep]))
                        del buf[:len(buf) - keep]
                    break
                sink.write(bytes(buf[:at]))
                del buf[:at + 2]                  # leave "--boundary" for the delimiter state
                sink.finish()
                sink = None
                parts += 1
                state = "delimiter"
            else:   # done: the epilogue is ignored (RFC 2046 5.1.1)
                buf.clear()
                break
    if state != "done":
        raise DicomwebError("the multipart answer broke off before its closing boundary "
                            f"(after {parts} complete parts)", kind="truncated")
    return parts


def new_boundary() -> str:
    return "fhirbridge-" + secrets.token_hex(16)


class MultipartBody:
    """A multipart/related body over `files` (each sent as one `part_type` part), read in blocks."""

    def __init__(self, files: list[Path], *, boundary: str, part_type: str = "application/dicom"):
        self.boundary = boundary
        self._segments: list[bytes | Path] = []
        for path in files:
            self._segments.append(f"--{boundary}\r\nContent-Type: {part_type}\r\n"
                                  f"Content-Length: {path.stat().st_size}\r\n\r\n".encode("ascii"))
            self._segments.append(path)
            self._segments.append(b"\r\n")
        self._segments.append(f"--{boundary}--\r\n".encode("ascii"))
        self._file: BinaryIO | None = None
        self._sizes = [len(s) if isinstance(s, bytes) else s.stat().st_size for s in self._segments]
        self._length = sum(self._sizes)
        self.seek(0)

    def __len__(self) -> int:
        return self._length

    def __iter__(self):   # requests treats a body with __iter__ as a stream (and then reads it by blocks)
        while block := self.read(1024 * 1024):
            yield block

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if (pos, whence) != (0, os.SEEK_SET) and whence != os.SEEK_END:
            raise OSError("MultipartBody can only be rewound")
        self._close_file()
        self._index, self._offset = 0, 0
        self._pos = self._length if whence == os.SEEK_END else 0
        if whence == os.SEEK_END:
            self._index = len(self._segments)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        size = 1024 * 1024 if size is None or size < 0 else size
        out = bytearray()
        while len(out) < size and self._index < len(self._segments):
            segment = self._segments[self._index]
            if isinstance(segment, bytes):
                piece = segment[self._offset:self._offset + size - len(out)]
            else:
                if self._file is None:
                    self._file = open(segment, "rb")   # kept open across read() calls
                piece = self._file.read(size - len(out))
            out += piece
            self._offset += len(piece)
            if self._offset >= self._sizes[self._index]:
                self._close_file()
                self._index, self._offset = self._index + 1, 0
            elif not piece:
                raise OSError("a file changed size while it was being sent")
        self._pos += len(out)
        return bytes(out)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None

    def close(self) -> None:
        self._close_file()
