"""One frame of a DICOM part-10 file as a PNG, with a window/level applied: what the portal's viewer shows.

Rendered on the server, in memory, for each request (the frames are patient records: nothing is cached on
disk; the response is `no-store`). The pixels are decoded by pydicom from the file as the PACS stored it:
uncompressed and RLE Lossless always (pydicom's own decoders); JPEG, JPEG-LS and JPEG 2000 only when a
decoder plug-in is installed (pylibjpeg, GDCM, Pillow's OpenJPEG). A syntax no installed plug-in decodes
is `CannotDisplay`, which the page shows as "cannot display; download the DICOM", never a crash.

The grey scale pipeline is PS3.3's: the Modality LUT (C.11.1, Rescale Slope/Intercept: CT values become
Hounsfield units), then the VOI LUT as a linear window (C.11.2.1.2.1), then MONOCHROME1 inverted
(C.7.6.3.1.2, "minimum sample value is intended to be displayed as white"). Colour images are shown as RGB
without a window.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_rescale, pixel_array

from fhirbridge.errors import FhirbridgeError

# CT presets (centre, width) in Hounsfield units, as radiology viewers name them.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "soft-tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
THUMBNAIL = 96
MAX_SIDE = 2048          # larger frames are scaled down for the screen (the download keeps every pixel)


class CannotDisplay(FhirbridgeError):
    """This frame cannot be shown here (a transfer syntax without a decoder, no pixels, a frame that is not
    there); the reviewer can still download the DICOM file and open it in a viewer of their own."""


@dataclass(frozen=True)
class Window:
    center: float
    width: float


def window_level(values: np.ndarray, window: Window) -> np.ndarray:
    """Values (after the Modality LUT) to 8-bit grey by PS3.3 C.11.2.1.2.1, the linear VOI function:
    below c - 0.5 - (w-1)/2 black, above c - 0.5 + (w-1)/2 white, linear between."""
    c, w = window.center, max(window.width, 1.0)
    x = values.astype(np.float64)
    low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    if w == 1:
        out = np.where(x <= low, 0.0, 255.0)
    else:
        out = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
        out = np.where(x <= low, 0.0, np.where(x > high, 255.0, out))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def default_window(ds: Dataset, values: np.ndarray) -> Window:
    """The file's own first Window Center/Width (C.11.2.1.2), else the range of this frame's values."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = center[0] if isinstance(center, pydicom.multival.MultiValue) else center
        w = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
        try:
            if float(w) >= 1:
                return Window(float(c), float(w))
        except (TypeError, ValueError):
            pass                      # a malformed window in the file: fall back to the range
    lo, hi = float(np.min(values)), float(np.max(values))
    return Window((lo + hi + 1) / 2, max(hi - lo + 1, 1.0))


def frame_count(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def read_frame(path: Path, frame: int = 0) -> tuple[Dataset, np.ndarray]:
    """The file's header and one frame's pixels as stored (no Modality LUT yet)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=False)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise CannotDisplay(f"not a readable DICOM file: {exc}") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise CannotDisplay("this instance holds no image (no Pixel Data)")
    frames = frame_count(ds)
    if not 0 <= frame < frames:
        raise CannotDisplay(f"frame {frame + 1} is not in this instance (it has {frames})")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        arr = pixel_array(ds, index=frame if frames > 1 else None)
    except (NotImplementedError, RuntimeError, ValueError, TypeError, AttributeError, KeyError) as exc:
        name = getattr(syntax, "name", None) or str(syntax)
        raise CannotDisplay(f"cannot display this image here (transfer syntax {name}: no decoder installed; "
                            f"{type(exc).__name__}); download the DICOM file and open it in your own viewer"
                            ) from None
    return ds, arr


def render_png(path: Path, *, frame: int = 0, window: Window | None = None, max_side: int = MAX_SIDE) -> bytes:
    """One frame as PNG bytes: Modality LUT, window (given, else the file's, else the range), MONOCHROME1
    inverted, scaled down to `max_side` if larger."""
    ds, arr = read_frame(path, frame)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        # pydicom converts YBR to RGB by default (pixel_array as_rgb); a palette image is not handled.
        img = Image.fromarray(np.clip(arr[..., :3], 0, 255).astype(np.uint8), "RGB")
    elif arr.ndim == 2:
        values = apply_rescale(arr, ds)
        grey = window_level(values, window or default_window(ds, values))
        if photometric == "MONOCHROME1":
            grey = 255 - grey
        img = Image.fromarray(grey, "L")
    else:
        raise CannotDisplay(f"cannot display pixels of shape {arr.shape} ({photometric})")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=3)
    return out.getvalue()


def parse_window(center: str | None, width: str | None) -> Window | None:
    """A window from a request's `wc`/`ww` (both or neither); a bad value is None (the default window)."""
    if center is None or width is None:
        return None
    try:
        c, w = float(center), float(width)
    except ValueError:
        return None
    if not (np.isfinite(c) and np.isfinite(w)) or w < 1 or abs(c) > 1e7 or w > 1e7:
        return None
    return Window(c, w)
