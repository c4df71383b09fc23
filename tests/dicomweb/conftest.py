"""Fixtures of the DICOMweb tests: a real PACS (Orthanc with its DICOMweb plugin, tests/kit/pacs.py) for the
session, a generated study and pydicom's bundled files uploaded to it once, a client, and the fault proxy
(tests/kit/faultproxy.py) in front of the PACS. Without Orthanc every test here skips, saying how to install it."""
from __future__ import annotations

import pytest

from fhirbridge.dicomweb import DicomwebClient
from tests.kit.dicom_studies import Study, bundled_files, make_study
from tests.kit.faultproxy import FaultProxy
from tests.kit.pacs import Pacs, find_orthanc


@pytest.fixture(scope="session")
def pacs(tmp_path_factory: pytest.TempPathFactory):
    """Orthanc on a free 127.0.0.1 port with a temporary storage folder, for the whole session."""
    try:
        find_orthanc()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    server = Pacs.start(tmp_path_factory.mktemp("pacs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def study(pacs: Pacs, tmp_path_factory: pytest.TempPathFactory) -> Study:
    """A generated study (CT, MR, multi-frame, RLE Lossless series) uploaded through Orthanc's REST API."""
    generated = make_study(tmp_path_factory.mktemp("study"))
    pacs.upload(generated.files)
    return generated


@pytest.fixture(scope="session")
def bundled(pacs: Pacs, tmp_path_factory: pytest.TempPathFactory) -> list[Study]:
    """pydicom's bundled files (CT, MR, JPEG 2000, RT Dose multi-frame, RLE colour), each its own study."""
    studies = bundled_files(tmp_path_factory.mktemp("bundled"))
    pacs.upload([f for s in studies for f in s.files])
    return studies


@pytest.fixture
def dicomweb(pacs: Pacs):
    with DicomwebClient(pacs.dicomweb_url) as client:
        yield client


@pytest.fixture
def pacs_proxy(pacs: Pacs):
    """The fault-injecting proxy in front of the PACS's DICOMweb root."""
    p = FaultProxy(pacs.dicomweb_url)
    try:
        yield p
    finally:
        p.close()
