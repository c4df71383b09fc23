"""The shared test kit, imported as `from tests.kit.<module> import ...` (never from a conftest):

- hospital: a test hospital against the session EHR, its reviewers, the physician's and reviewer's moves, and
  real `fhirbridge worker` / `fhirbridge serve` processes (Worker, Served)
- processes: starting a process in its own group, waiting for it until a deadline, stopping its whole group
- browser: Chromium for the browser tests, screenshots, a live WSGI server (the fixtures: tests/ui/conftest.py)
- smart_launch_server: a test EHR that launches SMART apps, in front of the session's sekmet
- faultproxy: a fault-injecting HTTP proxy in front of the EHR
- ehrproxy: the capability proxy (a FaultProxy) that makes sekmet write like a less capable EHR, and the
  profiles (behaviour + `[hospital.ehr]` pins + the write plan expected) the write-plan tests run
- pacs: a real PACS (Debian's Orthanc with its DICOMweb plugin) on a free loopback port
- dicom_studies: real DICOM studies generated with pydicom (CT, MR, multi-frame, RLE Lossless), pydicom's files
- scopegate: a SMART sekmet granting an exact scope list, behind a gate that authorises each transaction entry
- packages: hand-made hospital key pairs and sealed packages, for reviewer-side tests without an EHR
- metrics: reading /metrics (the Prometheus text format)
- logcapture: fhirbridge's JSON log handler into a buffer, the root logger put back afterwards
- cli: running the `fhirbridge` command in-process; `init` into a temporary site
"""
