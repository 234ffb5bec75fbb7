"""DICOM and NIfTI files written from scratch for the imaging tests (no sample data)."""

import gzip
import struct

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
  CTImageStorage,
  ExplicitVRLittleEndian,
  SecondaryCaptureImageStorage,
  generate_uid,
)

PATIENT = "Doe^Jane"  # must never appear in an error or a log line


def write_dicom(path, pixels, *, photometric="MONOCHROME2", slope=None, intercept=None, center=None, width=None,
                voi_function=None, planar=0, transfer_syntax=ExplicitVRLittleEndian, pixel_bytes=None,
                with_pixels=True, frames=None, extra=None):
  """A DICOM Part 10 file written from scratch (no sample data): int16 grayscale or uint8 RGB."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = CTImageStorage if photometric.startswith("MONO") else SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = transfer_syntax
  ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.PatientName = PATIENT
  ds.PatientID = "MRN-0042"
  ds.Modality = "CT" if photometric.startswith("MONO") else "OT"
  if with_pixels:
    a = np.asarray(pixels)
    rgb = photometric in ("RGB", "YBR_FULL")
    ds.Rows, ds.Columns = (a.shape[-3], a.shape[-2]) if rgb else (a.shape[-2], a.shape[-1])
    if frames:
      ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric
    if rgb:
      ds.PlanarConfiguration = planar
      ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
      a = a.astype(np.uint8)
      data = np.moveaxis(a, -1, -3).tobytes() if planar == 1 else a.tobytes()  # planar 1: RRR..GGG..BBB
    else:
      ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
      data = a.astype("<i2").tobytes()
    ds.PixelData = pixel_bytes if pixel_bytes is not None else data
  if slope is not None:
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  if center is not None:
    ds.WindowCenter, ds.WindowWidth = center, width
  if voi_function:
    ds.VOILUTFunction = voi_function
  for key, value in (extra or {}).items():
    setattr(ds, key, value)
  ds.save_as(path, enforce_file_format=True)
  return path


def write_nifti(path, raw, affine, *, slope=None, inter=None, cal=None):
  """A NIfTI-1 file; scl_slope/scl_inter and cal_min/cal_max are patched into the header bytes so the
  stored integers stay exactly `raw` (nibabel would otherwise choose its own scaling on save)."""
  img = nib.Nifti1Image(np.asarray(raw, dtype=np.int16), affine)
  img.header.set_data_dtype(np.int16)
  plain = path.with_name(path.name[:-3]) if path.name.endswith(".gz") else path
  nib.save(img, plain)
  blob = bytearray(plain.read_bytes())
  if slope is not None:
    blob[112:120] = struct.pack("<ff", slope, inter)  # scl_slope, scl_inter
  if cal is not None:
    blob[124:132] = struct.pack("<ff", cal[1], cal[0])  # cal_max, cal_min
  if path.name.endswith(".gz"):
    plain.unlink()
    path.write_bytes(gzip.compress(bytes(blob)))
  else:
    plain.write_bytes(bytes(blob))
  return path
