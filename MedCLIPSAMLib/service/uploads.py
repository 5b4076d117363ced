"""Uploaded volume bytes -> a SimpleITK image, refusing what could harm the service.

The format is told from the bytes (NRRD, NIfTI-1/2, either gzipped as .nii.gz), never from a name the
client gives. A NRRD header that points at a detached data file is refused: a client never names a file
on the server. The image size is read from the header before any voxel is, and capped.
"""

import os
import struct
import tempfile

from ..errors import MedCLIPSAMError

MAX_VOXELS = 1024**3        # 1 G voxels (a 1024 x 1024 x 1024 volume); more is refused before reading


def sniff_suffix(data):
    """The file suffix the bytes call for, or a one-sentence error."""
    if data[:4] == b"NRRD":
        _check_nrrd_header(data)
        return ".nrrd"
    if data[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if len(data) >= 348:
        for order in "<>":
            if struct.unpack(order + "i", data[:4])[0] in (348, 540):
                return ".nii"
    raise MedCLIPSAMError("the upload is not a NRRD or NIfTI volume (send the file's bytes as they are)")


def _check_nrrd_header(data):
    header = data.split(b"\n\n", 1)[0][:65536].decode("latin-1")
    for line in header.splitlines()[1:]:
        key = line.split(":", 1)[0].strip().lower()
        if key in ("data file", "datafile"):
            raise MedCLIPSAMError("NRRD files with a detached data file are not accepted; send one .nrrd "
                                  "with the voxels inside")


def read_upload(data, folder):
    """Read uploaded bytes as a 3D volume (io.read_volume's rules), via a private temporary file."""
    import SimpleITK as sitk

    from ..io import read_volume

    suffix = sniff_suffix(data)
    fd, path = tempfile.mkstemp(dir=folder, prefix="upload-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise MedCLIPSAMError("the upload could not be read as a volume (corrupt or truncated file)") from None
        voxels = 1
        for n in reader.GetSize():
            voxels *= max(1, n)
        if voxels * reader.GetNumberOfComponents() > MAX_VOXELS:
            raise MedCLIPSAMError(f"the volume has more than {MAX_VOXELS} voxels; crop or downsample it first")
        try:
            return read_volume(path)
        except MedCLIPSAMError as exc:     # its sentences name the temporary file: say "the upload" instead
            text = str(exc)
            if text.startswith(f"cannot read '{path}'"):   # ITK's own words may be long: not passed on
                text = "the upload could not be read as a volume (corrupt or truncated file)"
            raise MedCLIPSAMError(text.replace(f"'{path}'", "the upload").replace(path, "the upload")) from None
    finally:
        os.remove(path)
