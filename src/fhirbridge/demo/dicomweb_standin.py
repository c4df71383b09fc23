"""The demo's stand-in PACS: a minimal, read-only DICOMweb endpoint over a folder of DICOM files.

DEMO STAND-IN, NOT A PACS. `fhirbridge demo` uses it when Orthanc is not installed, so that a study travels
end to end on a machine with pip alone. It answers only what fhirbridge's collect asks (PS3.18):

- QIDO-RS (10.6): `GET /studies`, `/studies/{study}/series`, `/studies/{study}/series/{series}/instances`
  and `/studies/{study}/instances`, as DICOM JSON (F.2), with `limit`/`offset` paging (8.3.4.4) and exact
  matching on StudyInstanceUID / SeriesInstanceUID;
- WADO-RS (10.4): `GET /studies/{study}` and `/studies/{study}/series/{series}` as
  `multipart/related; type="application/dicom"` (8.6.1.2), each part a stored file byte for byte.

No STOW-RS, no rendering, no authentication, loopback only. Every answer carries `X-Fhirbridge-Demo:
dicomweb-stand-in`. The tests use Orthanc as their PACS (tests/kit/pacs.py); this stand-in is tested by
itself, against fhirbridge's own DICOMweb client (tests/demo/test_dicomweb_standin.py).
"""
from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from fhirbridge import jsonutil

LABEL = "dicomweb-stand-in"
NAME = "fhirbridge demo stand-in (read-only DICOMweb, not a PACS)"
DICOM_JSON = "application/dicom+json"
PREFIX = "/dicom-web"

STUDY_TAGS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "PatientName",
              "PatientID", "ModalitiesInStudy")
SERIES_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription")
INSTANCE_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "InstanceNumber",
                 "NumberOfFrames", "Rows", "Columns")


@dataclass
class _Instance:
    path: Path
    header: Dataset


def _subset(h: Dataset, names: tuple[str, ...], **extra) -> dict:
    ds = Dataset()
    for name in names:
        element = h.data_element(name) if name in h else None
        if element is not None:
            setattr(ds, name, element.value)
    for name, value in extra.items():
        setattr(ds, name, value)
    return ds.to_json_dict()


class StandIn:
    """The WSGI app over the instances below `folder` (read once, at start)."""

    def __init__(self, folder: Path):
        self.instances: list[_Instance] = []
        for p in sorted(Path(folder).rglob("*.dcm")):
            self.instances.append(_Instance(p, pydicom.dcmread(p, stop_before_pixels=True)))

    def _match(self, study: str | None = None, series: str | None = None) -> list[_Instance]:
        return [i for i in self.instances
                if (study is None or str(i.header.StudyInstanceUID) == study)
                and (series is None or str(i.header.SeriesInstanceUID) == series)]

    def __call__(self, environ, start_response):
        request = Request(environ)
        response = self.answer(request)
        response.headers["X-Fhirbridge-Demo"] = LABEL
        return response(environ, start_response)

    def answer(self, request: Request) -> Response:
        if request.method != "GET":
            return _error(405, "the demo stand-in is read-only (QIDO-RS and WADO-RS only)")
        parts = [p for p in request.path.split("/") if p]
        if not parts or parts[0] != "studies":
            return _error(404, "not a DICOMweb resource of the demo stand-in")
        study = parts[1] if len(parts) > 1 else request.args.get("StudyInstanceUID")
        series = parts[3] if len(parts) > 3 and parts[2] == "series" else request.args.get("SeriesInstanceUID")
        tail = parts[-1]
        if tail in ("studies", "series", "instances"):
            return self._qido(request, tail, study, series)
        if len(parts) in (2, 4):
            return self._wado(study, series if len(parts) == 4 else None)
        return _error(404, "not a DICOMweb resource of the demo stand-in")

    def _qido(self, request: Request, level: str, study: str | None, series: str | None) -> Response:
        found = self._match(study, series)
        rows: list[dict] = []
        if level == "studies":
            for uid in dict.fromkeys(str(i.header.StudyInstanceUID) for i in found):
                members = self._match(uid)
                rows.append(_subset(members[0].header, STUDY_TAGS,
                                    NumberOfStudyRelatedSeries=len({str(i.header.SeriesInstanceUID) for i in members}),
                                    NumberOfStudyRelatedInstances=len(members)))
        elif level == "series":
            for uid in dict.fromkeys(str(i.header.SeriesInstanceUID) for i in found):
                members = [i for i in found if str(i.header.SeriesInstanceUID) == uid]
                rows.append(_subset(members[0].header, SERIES_TAGS, NumberOfSeriesRelatedInstances=len(members)))
        else:
            rows = [_subset(i.header, INSTANCE_TAGS) for i in found]
        try:
            offset = max(int(request.args.get("offset", 0)), 0)
            limit = int(request.args["limit"]) if "limit" in request.args else len(rows)
        except ValueError:
            return _error(400, "limit and offset must be whole numbers")
        page = rows[offset:offset + max(limit, 0)]
        return Response(jsonutil.dumps(page), content_type=DICOM_JSON)

    def _wado(self, study: str | None, series: str | None) -> Response:
        found = self._match(study, series)
        if not found:
            return _error(404, "the demo stand-in holds no such study or series")
        boundary = secrets.token_hex(16)

        def body():
            for i in found:
                yield (f"--{boundary}\r\nContent-Type: application/dicom\r\n"
                       f"Content-Length: {i.path.stat().st_size}\r\n\r\n").encode()
                with open(i.path, "rb") as f:
                    while block := f.read(1 << 20):
                        yield block
                yield b"\r\n"
            yield f"--{boundary}--\r\n".encode()
        return Response(body(), content_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


def _error(status: int, message: str) -> Response:
    return Response(jsonutil.dumps({"error": message}), status=status, content_type="application/json")


class RunningStandIn:
    """The stand-in on a free 127.0.0.1 port, in a thread of this process; `url` is its DICOMweb base URL."""

    def __init__(self, folder: Path):
        self.app = StandIn(folder)
        self.server = make_server("127.0.0.1", 0, _Prefixed(self.app, PREFIX), threaded=True,
                                  request_handler=_Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}{PREFIX}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="dicomweb-stand-in", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> RunningStandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Quiet(WSGIRequestHandler):
    """No request log: the demo's output is its steps (and a URL names the patient's study)."""

    def log_request(self, code="-", size="-") -> None:
        pass


class _Prefixed:
    """Serve `app` below `prefix` (a DICOMweb base URL has a path, as a PACS's does)."""

    def __init__(self, app, prefix: str):
        self.app, self.prefix = app, prefix

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if not path.startswith(self.prefix):
            return Response("not found", status=404)(environ, start_response)
        environ["PATH_INFO"] = path[len(self.prefix):] or "/"
        return self.app(environ, start_response)
