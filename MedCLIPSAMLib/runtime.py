"""Device choice, seeds, logging and atomic file writes shared by every stage."""

import contextlib
import logging
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import MedCLIPSAMError

log = logging.getLogger("medclipsam")

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def select_device(name="auto"):
    """Return a torch.device: auto prefers cuda, then mps, then cpu; an unavailable choice is an error."""
    import torch

    if name not in DEVICE_CHOICES and not str(name).startswith("cuda:"):
        raise MedCLIPSAMError(f"unknown device '{name}'; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedCLIPSAMError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MedCLIPSAMError("device 'mps' was asked for but Apple MPS is not available; use --device cpu or auto")
    return torch.device(name)


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Without it PyTorch emulates bf16
    and autocast makes CPU inference slower, not faster. Linux reads /proc/cpuinfo; elsewhere: no."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def half_precision_helps(device):
    """The 'auto' autocast decision: on for CUDA and MPS, on a CPU only with native bf16. Measured on a
    2-core AVX512-BF16 CPU (benchmarks/results/speed_cpu.json): gScoreCAM 2.0x, M2IB 1.8x, SAM2 encoder
    1.3-1.4x faster in bf16."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return device.type in ("cuda", "mps")


def autocast(device, enabled=True, dtype=None):
    """bf16 autocast on CPU/CUDA (fp16 on MPS) when enabled, else a no-op context. enabled="auto":
    only where half precision is faster (half_precision_helps)."""
    import torch

    device = torch.device(device)
    if enabled == "auto":
        enabled = half_precision_helps(device)
    if not enabled:
        return contextlib.nullcontext()
    if dtype is None:
        dtype = torch.float16 if device.type == "mps" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


THREADS_ENV = "MEDCLIPSAM_THREADS"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
DEFAULT_WAIT_POLICY = "PASSIVE"
SPINCOUNT_ENV = "GOMP_SPINCOUNT"   # GNU OpenMP's own knob (how long a waiting thread spins); it wins over the policy

# What prepare_openmp() did; the report's and the log's runtime section read it.
openmp_setup = {"omp_wait_policy": None, "set_by": None, "before_torch": None}


def prepare_openmp(environ=None):
    """Let OpenMP's idle threads sleep instead of spinning: OMP_WAIT_POLICY=PASSIVE unless the user chose
    (OMP_WAIT_POLICY or GOMP_SPINCOUNT). torch's OpenMP runtime (libgomp on Linux) reads these once, when
    torch loads, so this must run before the first `import torch`: `medclipsam` (CLI and service, also as
    started by 3D Slicer) calls it first thing. A spinning thread keeps its core while the thread it waits
    for is descheduled; beside another busy process that multiplies the time of kernels with many short
    parallel regions (benchmarks/contention.py: libgomp's default spins 300000 rounds). Returns openmp_setup."""
    environ = os.environ if environ is None else environ
    before = "torch" not in sys.modules
    if environ.get(WAIT_POLICY_ENV) or environ.get(SPINCOUNT_ENV):   # the user's choice stays
        policy = environ.get(WAIT_POLICY_ENV) or f"{SPINCOUNT_ENV}={environ[SPINCOUNT_ENV]}"
        openmp_setup.update(omp_wait_policy=policy, set_by="environment", before_torch=before)
    elif before:
        environ[WAIT_POLICY_ENV] = DEFAULT_WAIT_POLICY
        openmp_setup.update(omp_wait_policy=DEFAULT_WAIT_POLICY, set_by="medclipsam", before_torch=True)
    else:   # too late: torch's OpenMP already runs with its default (active for a while, then sleep)
        openmp_setup.update(omp_wait_policy=None, set_by=None, before_torch=False)
    return openmp_setup


def usable_cpus():
    """The cores this process may run on (its affinity mask, e.g. under taskset or a container), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure_threads(threads=None):
    """Set torch's intra-op threads: `threads`, else $MEDCLIPSAM_THREADS, else every usable core. torch's own
    default counts physical cores only, which leaves hyper-threads idle. Returns the number set."""
    import torch

    value = threads if threads is not None else os.environ.get(THREADS_ENV) or None
    if value is None:
        n = usable_cpus()
    else:
        try:
            n = int(value)
        except ValueError:
            raise MedCLIPSAMError(f"{THREADS_ENV} must be a whole number of threads, got '{value}'") from None
        if n < 1:
            raise MedCLIPSAMError(f"the number of threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


PRECISION_STAGES = ("gate", "saliency", "sam")   # CLIP image tower over the slices; saliency; SAM2 encoder+decoder


def precision_plan(device_type, autocast_setting="auto", native_bf16=False):
    """({stage: "bf16" | "fp16" | "fp32"}, reason): the precision each stage computes in, and why. Pure (no
    torch), so the decision itself is testable. "auto" is half precision on CUDA/MPS and on CPUs with
    native bf16, for every stage: with OMP_WAIT_POLICY=PASSIVE (prepare_openmp) bf16 stayed faster than
    fp32 in the gate, M2IB and SAM2's encoder beside a 2-thread PyTorch process too, on an AVX512-BF16 CPU
    (benchmarks/results/contention_stages_cpu.json), so no stage is switched to fp32 under load."""
    half = "fp16" if device_type == "mps" else "bf16"
    if autocast_setting != "auto":
        chosen = half if autocast_setting else "fp32"
        return dict.fromkeys(PRECISION_STAGES, chosen), f"autocast={str(bool(autocast_setting)).lower()} was asked for"
    if device_type in ("cuda", "mps"):
        return dict.fromkeys(PRECISION_STAGES, half), f"auto: {half} on {device_type}"
    if native_bf16:
        return dict.fromkeys(PRECISION_STAGES, "bf16"), "auto: this CPU computes bf16 natively (avx512_bf16 or amx_bf16)"
    return dict.fromkeys(PRECISION_STAGES, "fp32"), "auto: this CPU has no native bf16 (it would be emulated: slower)"


def runtime_summary(device, autocast_setting="auto", cpu_runtime=None):
    """What a segmentation computes with, for the log and the report: device, torch threads, the OpenMP
    wait policy (and who set it), the precision per stage and the reason; cpu_runtime: what
    models.cpu_runtime.accelerate_sam_encoder chose for SAM2's encoder, and why."""
    import torch

    device = torch.device(device)
    precision, reason = precision_plan(device.type, autocast_setting,
                                       device.type == "cpu" and cpu_has_native_bf16())
    return {"device": str(device), "threads": torch.get_num_threads(), "usable_cpus": usable_cpus(),
            "omp_wait_policy": openmp_setup["omp_wait_policy"] or os.environ.get(WAIT_POLICY_ENV) or "default",
            "wait_policy_set_by": openmp_setup["set_by"] or ("environment" if os.environ.get(WAIT_POLICY_ENV)
                                                             else None),
            "precision": precision, "reason": reason, "cpu_runtime": cpu_runtime}


def runtime_line(summary):
    """One log line of runtime_summary()."""
    stages = ", ".join(f"{k} {v}" for k, v in summary["precision"].items())
    by = f" (set by {summary['wait_policy_set_by']})" if summary["wait_policy_set_by"] else ""
    cpu = summary.get("cpu_runtime")
    encoder = f"; SAM2 encoder in {cpu['sam_encoder']} ({cpu['reason']})" if cpu else ""
    return (f"runtime: {summary['device']}, {summary['threads']} threads, OpenMP wait policy "
            f"{summary['omp_wait_policy']}{by}; {stages} ({summary['reason']}){encoder}")


def seed_everything(seed):
    """Seed python, numpy and torch so runs are reproducible."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup_logging(verbose=False):
    # our own messages at INFO; other libraries (sam2 logs every image it encodes) only from WARNING
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


@contextlib.contextmanager
def atomic_output(path, suffix=None):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on any error removed.

    A failed or cancelled run therefore never leaves a half-written file, and an existing file is only
    replaced once the new one is complete. A killed run (SIGKILL) cannot clean up: its partial file is
    removed by the next write of the same output.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise MedCLIPSAMError(f"cannot write '{path}': folder '{directory}' does not exist")
    if not os.access(directory, os.W_OK):
        raise MedCLIPSAMError(f"cannot write '{path}': folder '{directory}' is not writable")
    base = os.path.basename(path)
    # keep the full multi-part extension (.seg.nrrd, .nii.gz) so writers pick the right format
    ext = suffix if suffix is not None else base[base.find("."):] if "." in base else ""
    remove_stale(directory, f".{base}.")  # a killed run's partial file for this output
    fd, tmp = tempfile.mkstemp(prefix=owned_prefix(f".{base}."), suffix=f".part{ext}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes owner-only files; give the output the permissions a normal new file gets
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        try:
            os.replace(tmp, path)
        except OSError as exc:  # e.g. a folder of that name: one sentence (segment-batch then skips the case)
            raise MedCLIPSAMError(f"cannot write '{path}': {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def staged_outputs():
    """Yield staged(path) -> a temporary path beside `path` (None -> None). The files are renamed into place
    together when the block ends without an error; an error or a cancel inside leaves none of them."""
    with contextlib.ExitStack() as outputs:
        yield lambda path: outputs.enter_context(atomic_output(path)) if path else None


# Temporary files and folders are named "<prefix><owner pid>-<random>" in a known place, so that one left
# by a process killed with SIGKILL (no cleanup runs) is recognised as stale and removed by the next run.
SCRATCH_ROOT = "medclipsam-scratch"


def scratch_root():
    """The folder holding every scratch folder: in the temp dir, one per user (POSIX /tmp is shared)."""
    uid = f"-{os.getuid()}" if hasattr(os, "getuid") else ""
    return Path(tempfile.gettempdir()) / (SCRATCH_ROOT + uid)


def pid_alive(pid):
    """Whether process `pid` exists (on Windows os.kill(pid, 0) would send Ctrl-C, so ask the kernel)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def owned_prefix(prefix=""):
    """The name prefix of this process's temporary files: remove_stale() recognises them."""
    return f"{prefix}{os.getpid()}-"


def remove_stale(directory, prefix=""):
    """Remove the entries of `directory` named "<prefix><pid>-..." whose process is gone; returns their paths."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        owner = entry.name[len(prefix):].split("-", 1)[0] if entry.name.startswith(prefix) else ""
        if not owner.isdigit() or pid_alive(int(owner)):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)
        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def scratch_folder():
    """A private temporary folder, removed on exit; one left by a killed process is removed by the next call."""
    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)
    folder = Path(tempfile.mkdtemp(prefix=owned_prefix(), dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
