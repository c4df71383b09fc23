"""The viewer's renderer: PS3.3's window/level arithmetic, the Modality LUT, MONOCHROME1, multi-frame,
RLE, and a transfer syntax no decoder knows (a clear CannotDisplay, never a crash)."""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image

from fhirbridge.ui.dicom_render import (
    CT_PRESETS,
    CannotDisplay,
    Window,
    default_window,
    parse_window,
    render_png,
    window_level,
)
from tests.kit.dicom_studies import make_study
from tests.kit.imaging_packages import UNDECODABLE_SYNTAX


def _grey(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_the_linear_window_follows_ps3_3_c_11_2_1_2_1():
    # c=40, w=400 (soft tissue): black at or below c-0.5-(w-1)/2 = -160, white above c-0.5+(w-1)/2 = 239.
    values = np.array([-1000, -160, -159, 39.5, 239, 240, 3000])
    out = window_level(values, Window(40, 400))
    assert out.tolist()[:2] == [0, 0] and out.tolist()[-2:] == [255, 255]
    assert out[3] == 128                      # the centre maps to the middle grey
    assert 0 < out[2] < 3 and 252 < out[4] <= 255
    # Width 1: a threshold at the centre.
    assert window_level(np.array([39, 40, 41]), Window(40, 1)).tolist() == [0, 255, 255]


def _ct_ramp(tmp_path):
    """A CT slice whose stored values run 0..4095 (-1024..3071 HU): every window shows part of it."""
    study = make_study(tmp_path, ct_slices=1, mr_slices=1, frames=2, rle_slices=1)
    ct = next(iter(study.series.values()))[0]
    ds = pydicom.dcmread(ct)
    ds.PixelData = np.arange(64 * 64, dtype="<u2").tobytes()
    ds.save_as(ct)
    return ct


def test_presets_and_a_manual_window_give_different_pixels_of_the_same_ct_slice(tmp_path):
    ct = _ct_ramp(tmp_path)
    shown = {name: _grey(render_png(ct, window=Window(*cw))) for name, cw in CT_PRESETS.items()}
    assert len({a.tobytes() for a in shown.values()}) == len(CT_PRESETS)
    # The Modality LUT is applied first: the stored value 0 is -1024 HU, black in every preset but none whiter.
    ds = pydicom.dcmread(ct)
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(shown["lung"], window_level(hu, Window(*CT_PRESETS["lung"])))


def test_the_files_own_window_is_the_default_and_monochrome1_is_inverted(tmp_path):
    study = make_study(tmp_path, ct_slices=1, mr_slices=1, frames=2, rle_slices=1)
    ct = next(iter(study.series.values()))[0]
    ds = pydicom.dcmread(ct)
    assert default_window(ds, ds.pixel_array) == Window(40, 400)
    normal = _grey(render_png(ct))
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted_path = tmp_path / "mono1.dcm"
    ds.save_as(inverted_path)
    assert np.array_equal(_grey(render_png(inverted_path)), 255 - normal)


def test_each_frame_of_a_multi_frame_instance_and_rle_render(tmp_path):
    study = make_study(tmp_path, ct_slices=1, mr_slices=1, frames=4, rle_slices=1)
    multi = list(study.series.values())[2][0]
    frames = [_grey(render_png(multi, frame=i)).tobytes() for i in range(4)]
    assert len(set(frames)) == 4
    with pytest.raises(CannotDisplay, match="frame 5 is not in this instance"):
        render_png(multi, frame=4)
    rle = list(study.series.values())[3][0]
    assert pydicom.dcmread(rle).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert _grey(render_png(rle)).shape == (64, 64)


def test_a_transfer_syntax_without_a_decoder_cannot_be_displayed_and_says_so(tmp_path):
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False))
    ds.file_meta.TransferSyntaxUID = UNDECODABLE_SYNTAX
    path = tmp_path / "private.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(CannotDisplay, match="cannot display this image here .*download the DICOM file"):
        render_png(path)
    not_dicom = tmp_path / "x.dcm"
    not_dicom.write_bytes(b"not dicom at all")
    with pytest.raises(CannotDisplay, match="not a readable DICOM file"):
        render_png(not_dicom)


def test_a_window_from_the_query_string_is_checked():
    assert parse_window("40", "400") == Window(40, 400)
    assert parse_window("40", None) is None
    assert parse_window("nan", "400") is None
    assert parse_window("40", "0") is None
    assert parse_window("x", "400") is None
