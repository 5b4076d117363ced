"""Peak memory of `medclipsam serve` while it refuses hostile uploads and bodies (issue 31), against the size
of what was sent. Each case runs on a fresh service (tiny-random models, CPU), so its peak resident memory
(VmHWM of the service process, read from /proc) before and after the request isolates that request.

    python -m benchmarks.service_uploads [--repo PATH] [--cases NAME ...] [--json OUT.json]

--repo runs the service from another checkout (e.g. the code before the fix) for a side-by-side record.
Linux only (/proc). Figures depend on what else runs on the machine: the record says what ran beside.
"""

import argparse
import gzip
import http.client
import json
import os
import platform
import struct
import sys
import time
import urllib.parse
from pathlib import Path

from benchmarks import write_record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedCLIPSAM"))
MB = 1024**2


def nrrd(fields, payload, comments=b""):
    return b"NRRD0004\n" + comments + b"\n".join(fields) + b"\n\n" + payload


def nifti_header(dims, datatype=16, bitpix=32):
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<hh", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, *([1.0] * 8))
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\x00"
    return bytes(header)


def gzip_of_zeros(n):
    """gzip bytes of n zero bytes, compressed piece by piece (the zeros are never held whole)."""
    import zlib

    packer, piece, parts = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS), b"\0" * MB, []
    for _ in range(n // MB):
        parts.append(packer.compress(piece))
    return b"".join(parts) + packer.flush()


FLOAT_256MB = [b"type: float", b"dimension: 3", b"sizes: 512 512 256", b"endian: little"]


def cases():
    """name -> (method, path, body, chunked, what it is)"""
    zeros_64mb = b"\0" * (64 * MB)
    out = {
        "nrrd_promise_raw": ("POST", "/volumes", nrrd(FLOAT_256MB + [b"encoding: raw"], b"\0" * 64), False,
                             "NRRD header promising 512x512x256 float (256 MB), 64-byte raw payload"),
        "nrrd_promise_gzip": ("POST", "/volumes", nrrd(FLOAT_256MB + [b"encoding: gzip"], gzip.compress(b"")),
                              False, "the same header, a 20-byte gzip payload"),
        "nrrd_8gib_double": ("POST", "/volumes", nrrd([b"type: double", b"dimension: 3", b"sizes: 1024 1024 1024",
                                                       b"endian: little", b"encoding: raw"], b"\0" * 64), False,
                             "NRRD header promising 1 G voxels of double (8 GiB)"),
        "nrrd_gzip_bomb": ("POST", "/volumes", nrrd([b"type: float", b"dimension: 3", b"sizes: 256 256 256",
                                                     b"endian: little", b"encoding: gzip"],
                                                    gzip_of_zeros(1024 * MB)), False,
                           "NRRD promising 64 MB, gzip payload inflating to 1 GiB"),
        "nrrd_raw_one_byte_short": ("POST", "/volumes",
                                    nrrd([b"type: float", b"dimension: 3", b"sizes: 256 256 256", b"endian: little",
                                          b"encoding: raw"], zeros_64mb[:-1]), False,
                                    "NRRD promising 64 MB, raw payload one byte short"),
        "nrrd_detached_passwd": ("POST", "/volumes", nrrd([b"type: uchar", b"dimension: 3", b"sizes: 4 4 4",
                                                           b"encoding: raw", b"data file: /etc/passwd"], b"",
                                                          b"# padding\n" * 7500), False,
                                 "NRRD naming /etc/passwd after 73 KB of comments"),
        "nifti_header_alone": ("POST", "/volumes", nifti_header((512, 512, 256)), False,
                               "NIfTI-1 header alone (352 B) claiming 512x512x256 float"),
        "nifti_truncated": ("POST", "/volumes", nifti_header((512, 512, 256), 4, 16) + zeros_64mb[: 16 * MB],
                            False, "NIfTI-1 int16 512x512x256 (128 MB) with an eighth of its voxels"),
        "json_64mb": ("POST", "/jobs", json.dumps({"volume_id": "x", "prompts": ["a" * 1000] * (64 * 1024)}).encode(),
                      False, "64 MB JSON body to /jobs with a Content-Length"),
        "json_64mb_chunked": ("POST", "/jobs", json.dumps({"volume_id": "x", "prompts": ["a" * 1000] * (64 * 1024)}
                                                          ).encode(), True, "the same body chunked"),
        "valid_64mb_volume": ("POST", "/volumes", nrrd([b"type: float", b"dimension: 3", b"sizes: 256 256 256",
                                                        b"endian: little", b"encoding: raw"], zeros_64mb), False,
                              "for contrast: a valid 64 MB float NRRD (accepted)"),
    }
    return out


def peak_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024


def send(client, method, path, body, chunked):
    url = urllib.parse.urlsplit(client.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    headers = {"Authorization": f"Bearer {client.token}", "Content-Type": "application/octet-stream"
               if path == "/volumes" else "application/json"}
    start = time.perf_counter()
    try:
        if chunked:
            chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
            conn.request(method, path, body=chunks, headers=headers, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        status = response.status
        detail = json.loads(data).get("detail", "") if data[:1] == b"{" else ""
    except (BrokenPipeError, ConnectionResetError) as exc:   # the server answered and closed mid-send
        status, detail = None, type(exc).__name__
    conn.close()
    return status, detail, time.perf_counter() - start


def run_case(name, case, env):
    from MedCLIPSAMModuleLib.serviceclient import LocalService

    method, path, body, chunked, what = case
    service = LocalService(sys.executable, ["--models", "tiny-random", "--device", "cpu"], env=env, idle_exit=600)
    client = service.ensure()
    try:
        client.info()
        before, _ = peak_rss(service.process.pid)
        status, detail, seconds = send(client, method, path, body, chunked)
        after, rss = peak_rss(service.process.pid)
    finally:
        service.stop()
    return {"case": name, "what": what, "sent_bytes": len(body), "status": status, "detail": detail[:160],
            "peak_rss_before": before, "peak_rss_after": after, "peak_rise_bytes": after - before,
            "rise_minus_sent_mb": round((after - before - len(body)) / MB, 2), "seconds": round(seconds, 2)}


def main(argv=None):
    from benchmarks.speed import cpu_description

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(ROOT), help="checkout whose MedCLIPSAMLib the service runs")
    parser.add_argument("--cases", nargs="*", help="a subset of: " + ", ".join(cases()))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "service_uploads.json"))
    args = parser.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.repo), MEDCLIPSAM_OFFLINE="1")
    rows = []
    here = os.getcwd()
    for name, case in cases().items():
        if args.cases and name not in args.cases:
            continue
        os.chdir(args.repo)            # `python -m` puts the working folder first on the service's path
        try:
            rows.append(run_case(name, case, env))
        finally:
            os.chdir(here)
        r = rows[-1]
        print(f"{name:26s} sent {r['sent_bytes'] / MB:9.2f} MB  status {r['status']}  peak RSS rise "
              f"{r['peak_rise_bytes'] / MB:8.2f} MB  ({r['seconds']:.2f} s)  {r['detail'][:70]}", flush=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    record = {"benchmark": "service_uploads", "repo": os.path.abspath(args.repo), **cpu_description(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "load_average_at_end": load,
              "beside": "other helpers' test runs on the same 2 cores (shared machine)", "rows": rows}
    write_record(args.json, record)
    print(f"record: {args.json}")


if __name__ == "__main__":
    main()
