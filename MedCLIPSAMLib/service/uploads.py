"""Uploaded volume bytes -> a SimpleITK image, refusing what could harm the service.

The upload arrives as a file on the service's own disk (streamed there, never held whole in memory). Its
format is told from the bytes (NRRD, NIfTI-1/2, either NIfTI gzipped), never from a name the client gives.
Before SimpleITK sees anything, the header is parsed here and checked:
- a NRRD header is read whole (at most HEADER_LIMIT bytes) and any reference to another file (a detached
  data file, a LIST of files, a NIfTI .hdr/.img pair) is refused with one sentence that never depends on
  the server's files;
- the bytes the header promises (sizes x type size) must fit the service's byte cap and be exactly what
  the payload holds: raw data is measured, gzip/bzip2 data is decompressed in bounded chunks and counted.
SimpleITK then reads a file rebuilt from what was checked (a NRRD with only its parsed fields and raw
voxels; a plain .nii, a NIfTI-2 through a NIfTI-1 header made field by field, since ITK reads NIfTI-1 only),
so it allocates only the size already proven to be there.
"""

import bz2
import os
import re
import struct
import tempfile
import zlib

from ..errors import MedCLIPSAMError
from ..mrml import NRRD_TYPE_BYTES

HEADER_LIMIT = 1024**2      # a NRRD header (comments and key/value pairs included) longer than this is refused
CHUNK = 1024**2             # read / decompress step: what refusing an upload holds in memory at most, about
NOT_A_VOLUME = "the upload is not a NRRD or NIfTI volume (send the file's bytes as they are)"
UNREADABLE = "the upload could not be read as a volume (corrupt or truncated file)"
NIFTI2 = ("the NIfTI-2 header holds a value NIfTI-1 cannot (e.g. a size past 32767) and ITK reads NIfTI-1 "
          "only; send the volume as NRRD")
DETACHED = ("the upload's header refers to another file; send one .nrrd, .nii or .nii.gz with the voxels "
            "inside")

NRRD_ENCODINGS = {"raw": None, "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}
# NIfTI datatype code -> bytes per voxel (nifti1.h / nifti2.h)
NIFTI_ITEMSIZE = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                  1536: 16, 1792: 16, 2048: 32, 2304: 4}


class TooLarge(MedCLIPSAMError):
    """A volume whose voxels would pass the service's byte cap (HTTP 413)."""


def _too_big(promised, limit):
    return TooLarge(f"the volume's voxels take {promised} bytes, more than the service's limit of {limit} "
                           "bytes; crop or downsample it first")


def _mismatch(promised, what):
    return MedCLIPSAMError(f"the upload's {what} does not hold the {promised} bytes of voxels its header "
                           "promises (a truncated or corrupt file)")


# -- bounded decompression ------------------------------------------------------------------------
def inflate(src, kind):
    """Yield the decompressed bytes of file object `src` (gzip or bzip2) in pieces of at most CHUNK,
    whatever the compression ratio; raises ValueError on a corrupt, truncated or trailing stream."""
    if kind == "gzip":
        d, pending, ended = zlib.decompressobj(16 + zlib.MAX_WBITS), b"", False
        while not d.eof:
            if not pending and not ended:
                pending = src.read(CHUNK)
                ended = not pending
            try:
                out = d.decompress(pending, CHUNK)
            except zlib.error:
                raise ValueError("corrupt") from None
            pending = d.unconsumed_tail
            if not out and ended and not pending:
                break
            yield out
    else:
        d = bz2.BZ2Decompressor()
        while not d.eof:
            data = src.read(CHUNK) if d.needs_input else b""
            if d.needs_input and not data:
                break
            try:
                yield d.decompress(data, CHUNK)
            except (OSError, EOFError):
                raise ValueError("corrupt") from None
    if not d.eof or d.unused_data or src.read(1):   # truncated, or something after the stream's end
        raise ValueError("truncated or trailing data")


def _copy_exactly(chunks, dst, size, promised, what):
    """Write `chunks` to dst; refuse when they hold more or fewer than `size` bytes (stopping at the first
    byte too many). `promised`: the voxel bytes the sentence names."""
    total = 0
    try:
        for piece in chunks:
            total += len(piece)
            if total > size:
                raise _mismatch(promised, what)
            dst.write(piece)
    except ValueError:
        raise _mismatch(promised, what) from None
    if total != size:
        raise _mismatch(promised, what)


def _file_chunks(src):
    while True:
        piece = src.read(CHUNK)
        if not piece:
            return
        yield piece


# -- NRRD -----------------------------------------------------------------------------------------
def nrrd_header(head):
    """(header lines, offset of the data) of a NRRD's first bytes. Lines end at \\n, \\r\\n or a lone \\r,
    as in Teem's reader (a lone \\r must not hide a line from this check); the header ends at an empty line."""
    pos = 0
    lines = []
    for match in re.finditer(rb"\r\n|\r|\n", head):
        line = head[pos:match.start()]
        pos = match.end()
        if not line:
            return lines, pos
        lines.append(line)
        if pos > HEADER_LIMIT:
            break
    raise MedCLIPSAMError(f"the NRRD header is longer than {HEADER_LIMIT // 1024**2} MiB (or has no empty line "
                          "ending it); send a NRRD with a shorter header")


def _nrrd_fields(lines):
    """The header's fields {name: value} and the lines to keep (comments dropped); refuses references."""
    fields, keep = {}, [lines[0]]
    for raw in lines[1:]:
        line = raw.decode("latin-1")
        if line.startswith("#"):
            continue
        name = line.split(":", 1)[0].strip().lower()
        if name.replace(" ", "") == "datafile":       # also "data file: LIST" and a key/value of that name
            raise MedCLIPSAMError(DETACHED)
        keep.append(raw)
        if ":=" in line or ":" not in line:          # a key/value pair (metadata), or Teem will refuse it
            continue
        if name in fields:                           # which one Teem would use is not for us to guess
            raise MedCLIPSAMError(f"the NRRD header gives '{name}' twice")
        fields[name] = " ".join(line.split(":", 1)[1].split())
    return fields, keep


def _nrrd_promised(fields):
    """Bytes of voxels a NRRD header promises, and its decompressor kind (None: raw)."""
    try:
        itemsize = NRRD_TYPE_BYTES[fields.get("type", "").lower()]
        sizes = [int(v) for v in fields["sizes"].split()]
        dimension = int(fields.get("dimension", len(sizes)))
    except (KeyError, ValueError):
        raise MedCLIPSAMError("the NRRD header needs a known 'type', and 'sizes' as whole numbers") from None
    if not sizes or len(sizes) != dimension or min(sizes) < 1:
        raise MedCLIPSAMError("the NRRD header's 'sizes' must be one positive number per dimension")
    encoding = fields.get("encoding", "").lower()
    if encoding not in NRRD_ENCODINGS:
        raise MedCLIPSAMError(f"NRRD encoding '{encoding}' is not accepted; send raw, gzip or bzip2 data")
    for skip in ("byte skip", "byteskip", "line skip", "lineskip"):
        if fields.get(skip, "0") != "0":
            raise MedCLIPSAMError("NRRD 'byte skip' and 'line skip' are not accepted; send the voxels right "
                                  "after the header")
    promised = itemsize
    for n in sizes:
        promised *= n
    return promised, NRRD_ENCODINGS[encoding]


def _clean_nrrd(src, folder, limit):
    """A NRRD holding only the checked header fields and the raw voxels, in `folder`; returns its path."""
    head = src.read(HEADER_LIMIT + 2)
    lines, start = nrrd_header(head)
    fields, keep = _nrrd_fields(lines)
    promised, kind = _nrrd_promised(fields)
    if promised > limit:
        raise _too_big(promised, limit)
    size = os.fstat(src.fileno()).st_size - start
    if kind is None and size != promised:
        raise _mismatch(promised, "raw data")
    src.seek(start)
    keep = [line for line in keep if line.decode("latin-1").split(":", 1)[0].strip().lower() != "encoding"]
    fd, path = tempfile.mkstemp(dir=folder, prefix="volume-", suffix=".nrrd")
    with os.fdopen(fd, "wb") as dst:
        dst.write(b"\n".join(keep) + b"\nencoding: raw\n\n")
        chunks = _file_chunks(src) if kind is None else inflate(src, kind)
        what = f"{kind} data" if kind else "raw data"
        _copy_exactly(chunks, dst, promised, promised, what)
    return path


# -- NIfTI ----------------------------------------------------------------------------------------
def nifti_layout(head):
    """(header size, voxel offset, bytes of voxels promised, byte order) of a NIfTI-1 or NIfTI-2 header."""
    for order in "<>":
        if len(head) >= 4 and struct.unpack(order + "i", head[:4])[0] in (348, 540):
            break
    else:
        raise MedCLIPSAMError(NOT_A_VOLUME)
    size = struct.unpack(order + "i", head[:4])[0]
    if len(head) < size + 4:
        raise MedCLIPSAMError("the upload holds only part of a NIfTI header (a truncated file)")
    if size == 348:
        magic, single = head[344:348], b"n+1\x00"
        dims = struct.unpack(order + "8h", head[40:56])
        datatype = struct.unpack(order + "h", head[70:72])[0]
        offset = struct.unpack(order + "f", head[108:112])[0]
    else:
        magic, single = head[4:8], b"n+2\x00"
        datatype = struct.unpack(order + "h", head[12:14])[0]
        dims = struct.unpack(order + "8q", head[16:80])
        offset = struct.unpack(order + "q", head[168:176])[0]
    if magic[:2] == b"ni":                       # "ni1" / "ni2": the voxels are in a separate .img file
        raise MedCLIPSAMError(DETACHED)
    if magic != single:
        raise MedCLIPSAMError(NOT_A_VOLUME)
    if not 1 <= dims[0] <= 7 or min(dims[1:dims[0] + 1]) < 1:
        raise MedCLIPSAMError("the NIfTI header's dimensions must be 1 to 7 positive sizes")
    if datatype not in NIFTI_ITEMSIZE:
        raise MedCLIPSAMError(f"the NIfTI datatype {datatype} is not a known voxel type")
    if not (offset == int(offset) and offset >= size + 4):
        raise MedCLIPSAMError("the NIfTI header's voxel offset is not a whole number past the header")
    promised = NIFTI_ITEMSIZE[datatype]
    for n in dims[1:dims[0] + 1]:
        promised *= n
    return size, int(offset), promised, order


def nifti1_header(h, o):
    """The NIfTI-1 header (352 bytes: no extensions) of NIfTI-2 header `h` in byte order `o`, field by
    field (nifti1.h / nifti2.h): ITK vendors NIfTI-1's library only (InsightSoftwareConsortium/ITK issue
    3639), so a NIfTI-2 upload is read through this twin. Values NIfTI-1 cannot hold are refused."""
    out = bytearray(352)

    def get(fmt, at):
        return struct.unpack_from(o + fmt, h, at)

    def put(fmt, at, *values):
        struct.pack_into(o + fmt, out, at, *values)

    try:
        put("i", 0, 348)
        put("8h", 40, *get("8q", 16))                  # dim
        put("3f", 56, *get("3d", 80))                  # intent_p1..3
        put("h", 68, get("i", 504)[0])                 # intent_code
        put("2h", 70, *get("2h", 12))                  # datatype, bitpix
        put("h", 74, get("q", 224)[0])                 # slice_start
        put("8f", 76, *get("8d", 104))                 # pixdim
        put("f", 108, 352.0)                           # vox_offset
        put("2f", 112, *get("2d", 176))                # scl_slope, scl_inter
        put("h", 120, get("q", 232)[0])                # slice_end
        put("2B", 122, get("i", 496)[0], get("i", 500)[0])   # slice_code, xyzt_units
        put("4f", 124, *get("4d", 192))                # cal_max, cal_min, slice_duration, toffset
        put("2h", 252, *get("2i", 344))                # qform_code, sform_code
        put("6f", 256, *get("6d", 352))                # quatern_b, c, d, qoffset_x, y, z
        put("12f", 280, *get("12d", 400))              # srow_x, srow_y, srow_z
    except (struct.error, OverflowError):
        raise MedCLIPSAMError(NIFTI2) from None
    out[39] = h[524]                                   # dim_info
    out[148:228], out[228:252], out[328:344] = h[240:320], h[320:344], h[508:524]   # descrip, aux_file, intent_name
    out[344:348] = b"n+1\x00"
    return bytes(out)


def _clean_nifti(src, folder, limit, gzipped):
    """A plain .nii in `folder` whose voxels are exactly those its header promises; returns its path."""
    chunks = inflate(src, "gzip") if gzipped else _file_chunks(src)
    try:
        head = b""
        for piece in chunks:                         # enough bytes for either header
            head += piece
            if len(head) >= 544:
                break
    except ValueError:
        raise MedCLIPSAMError(UNREADABLE) from None
    size, offset, promised, order = nifti_layout(head)
    if promised > limit:
        raise _too_big(promised, limit)
    what = "gzip data" if gzipped else "NIfTI file"
    if not gzipped and os.fstat(src.fileno()).st_size != offset + promised:
        raise _mismatch(promised, what)
    twin = nifti1_header(head, order) if size == 540 else None   # refused before any byte is written
    fd, path = tempfile.mkstemp(dir=folder, prefix="volume-", suffix=".nii")
    with os.fdopen(fd, "wb") as dst:
        if twin is None:
            _copy_exactly(_prepend(head, chunks), dst, offset + promised, promised, what)
        else:                                          # the NIfTI-1 twin's header, then the same voxels
            dst.write(twin)
            _copy_exactly(_skip(_prepend(head, chunks), offset), dst, promised, promised, what)
    return path


def _prepend(first, rest):
    yield first
    yield from rest


def _skip(chunks, n):
    """The bytes of `chunks` after the first n."""
    for piece in chunks:
        if n >= len(piece):
            n -= len(piece)
            continue
        yield piece[n:]
        n = 0


# -- the upload -----------------------------------------------------------------------------------
def checked_file(upload, folder, limit):
    """The path of a file SimpleITK may read, rebuilt in `folder` from the upload at path `upload`, or a
    one-sentence MedCLIPSAMError. `limit`: the most bytes the voxels may take."""
    with open(upload, "rb") as src:
        head = src.read(544)
        src.seek(0)
        if head[:4] == b"NRRD":
            return _clean_nrrd(src, folder, limit)
        if head[:2] == b"\x1f\x8b":
            return _clean_nifti(src, folder, limit, gzipped=True)
        return _clean_nifti(src, folder, limit, gzipped=False)


def read_upload(upload, folder, limit):
    """Read the upload saved at path `upload` as a 3D volume (io.read_volume's rules)."""
    from ..io import read_volume

    path = checked_file(upload, folder, limit)
    try:
        return read_volume(path)
    except MedCLIPSAMError as exc:     # its sentences name the temporary file and CLI flags: say it for a client
        text = str(exc)
        if text.startswith(f"cannot read '{path}'"):   # ITK's own words may be long: not passed on
            text = UNREADABLE
        elif "--frame" in text:
            text = text.split(";")[0] + "; send one frame as a 3D volume"
        raise MedCLIPSAMError(text.replace(f"'{path}'", "the upload").replace(path, "the upload")) from None
    finally:
        os.remove(path)
