"""Retrieval memory is bounded whatever the series' size: the answer streams to disk part by part."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from fhirbridge.dicomweb import DicomwebClient
from tests.kit.dicom_studies import Study, large_series
from tests.kit.pacs import Pacs

SERIES_MIB = 40
PEAK_MIB = 8    # one 1 MiB chunk, its copy for the sink, the delimiter tail, requests' own buffers


@pytest.fixture(scope="module")
def big(pacs: Pacs, tmp_path_factory: pytest.TempPathFactory) -> Study:
    series = large_series(tmp_path_factory.mktemp("big"), SERIES_MIB)
    pacs.upload(series.files)
    return series


def test_a_series_many_times_the_bound_is_retrieved_within_it(pacs: Pacs, big: Study, tmp_path: Path):
    (series_uid,) = big.series
    with DicomwebClient(pacs.dicomweb_url) as client:
        tracemalloc.start()
        try:
            got = client.retrieve_series(big.study_uid, series_uid, tmp_path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert got.bytes > SERIES_MIB * 1024 * 1024 * 0.95
    assert {i.sop_instance_uid: i.sha256 for i in got.instances} == big.hashes()
    assert peak < PEAK_MIB * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB retrieving {got.bytes / 2**20:.0f} MiB"


def test_a_stow_of_that_series_streams_from_disk_within_the_bound(pacs: Pacs, big: Study):
    with DicomwebClient(pacs.dicomweb_url) as client:
        tracemalloc.start()
        try:
            result = client.store(big.files)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert set(result.stored) == set(big.hashes())
    assert peak < PEAK_MIB * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB storing {SERIES_MIB} MiB"
