"""multipart/related read and written as streams (fhirbridge/dicomweb/multipart.py; RFC 2046 5.1.1, PS3.18 8.6):
parts whatever the chunking, the delimiter split across chunks, a missing close delimiter, a body written
from files with its exact length and rewound for a retry."""
from __future__ import annotations

from pathlib import Path

import pytest

from fhirbridge.dicomweb.errors import DicomwebError
from fhirbridge.dicomweb.multipart import MultipartBody, boundary_of, read_parts


class _Collect:
    def __init__(self, out: list, headers: dict):
        self.out, self.headers, self.data = out, headers, bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def finish(self) -> None:
        self.out.append((self.headers, bytes(self.data)))


def _parse(body: bytes, boundary: bytes, chunk: int) -> list[tuple[dict, bytes]]:
    out: list = []
    read_parts((body[i:i + chunk] for i in range(0, len(body), chunk)), boundary, lambda h: _Collect(out, h))
    return out


# Bodies that contain CRLF, "--" and almost-delimiters: only the exact "CRLF--boundary" ends a part.
PAYLOADS = [b"\x00" * 128 + b"DICM" + b"\r\n--b0und\r\n--boun-\n--bound" * 3, b"", b"\r\n", b"x" * 5000 + b"\r\n--"]
BODY = (b"preamble, ignored\r\n"
        + b"".join(b"--bound\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in PAYLOADS)
        + b"--bound--\r\nepilogue, ignored")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 8, 9, 64, 1000, 1 << 20])
def test_every_part_whatever_the_chunking(chunk: int):
    parts = _parse(BODY, b"bound", chunk)
    assert [p for _h, p in parts] == PAYLOADS
    assert all(h == {"content-type": "application/dicom"} for h, _p in parts)


def test_a_part_without_headers_and_transport_padding():
    body = b"--bound  \t\r\n\r\nabc\r\n--bound\r\nX-A: 1\r\n\r\ndef\r\n--bound--"
    assert _parse(body, b"bound", 4) == [({}, b"abc"), ({"x-a": "1"}, b"def")]


@pytest.mark.parametrize("cut", [5, len(BODY) // 2, len(BODY) - len(b"--\r\nepilogue, ignored") - 1])
def test_a_body_without_its_close_delimiter_is_truncated_and_the_open_part_never_finished(cut: int):
    out: list = []
    with pytest.raises(DicomwebError) as err:
        read_parts([BODY[:cut]], b"bound", lambda h: _Collect(out, h))
    assert (err.value.kind, err.value.transient) == ("truncated", True)
    assert len(out) < len(PAYLOADS)


def test_malformed_bodies_are_refused():
    with pytest.raises(DicomwebError) as err:
        read_parts([b"x" * 20000], b"bound", lambda h: _Collect([], h))
    assert err.value.kind == "not-dicom"
    with pytest.raises(DicomwebError):
        read_parts([b"--bound\r\nno colon here\r\n\r\nabc\r\n--bound--"], b"bound", lambda h: _Collect([], h))


def test_the_boundary_parameter():
    assert boundary_of('multipart/related; type="application/dicom"; boundary="a b:c"') == b"a b:c"
    assert boundary_of("multipart/related; boundary=xyz; type=application/dicom") == b"xyz"
    for bad in ("application/dicom", "multipart/related; type=application/dicom", ""):
        with pytest.raises(DicomwebError):
            boundary_of(bad)


def test_a_body_written_from_files_knows_its_length_rewinds_and_reads_back(tmp_path: Path):
    files = []
    for i, payload in enumerate([b"\x00" * 128 + b"DICM" + bytes(range(256)) * 50, b"short", b""]):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(payload)
        files.append(path)
    body = MultipartBody(files, boundary="fb-123")
    first = b"".join(iter(lambda: body.read(333), b""))
    assert len(first) == len(body) == body.tell()
    body.seek(0)   # what urllib3 does before a retry
    assert b"".join(body) == first
    assert [p for _h, p in _parse(first, b"fb-123", 100)] == [f.read_bytes() for f in files]
    body.close()
