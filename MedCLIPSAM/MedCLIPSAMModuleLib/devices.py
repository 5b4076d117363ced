"""Which hardware a run will use: NVIDIA GPUs from nvidia-smi (asked in a thread, so opening the module
never waits for it; torch is never imported in Slicer's process), Apple silicon, or the CPU."""

import platform
import shutil
import subprocess
import sys
import threading

from .i18n import tr as _

# Below this much free GPU memory a run may fail with out-of-memory (BiomedCLIP + SAM2 in half precision).
MIN_GPU_FREE_MIB = 4096


def parseNvidiaSmi(text):
    """GPUs from `nvidia-smi --query-gpu=name,memory.free,memory.total --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            gpus.append({"name": parts[0], "freeMiB": int(float(parts[1])), "totalMiB": int(float(parts[2]))})
        except ValueError:
            continue
    return gpus


def describeDevice(device, gpus, appleSilicon=False):
    """(text, warning) for the device choice: which hardware runs, and whether it looks too small."""
    if device in ("auto", "cuda") and gpus:
        gpu = max(gpus, key=lambda g: g["freeMiB"])
        text = _("{name}: {free:.1f} GiB free of {total:.1f} GiB").format(
            name=gpu["name"], free=gpu["freeMiB"] / 1024, total=gpu["totalMiB"] / 1024)
        if gpu["freeMiB"] < MIN_GPU_FREE_MIB:
            return text + " - " + _("less than {need} GiB free: the run may fail for lack of memory; close "
                                    "other GPU programs or choose cpu").format(need=MIN_GPU_FREE_MIB // 1024), True
        return text, False
    if device == "cuda":
        return _("no NVIDIA GPU found (nvidia-smi did not answer): choose auto or cpu"), True
    if device in ("auto", "mps") and appleSilicon:
        return _("Apple GPU (memory shared with the system)"), False
    if device == "mps":
        return _("Apple MPS is only available on Apple silicon Macs: choose auto or cpu"), True
    return _("CPU: works everywhere but is slow; the 'fast' preset is recommended"), device == "auto"


def isAppleSilicon():
    return sys.platform == "darwin" and platform.machine() == "arm64"


def queryGpus(timeout=5.0):
    """NVIDIA GPUs with free memory, from nvidia-smi; blocks up to `timeout` (use GpuQuery on the GUI thread)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        done = subprocess.run([exe, "--query-gpu=name,memory.free,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return parseNvidiaSmi(done.stdout) if done.returncode == 0 else []


class GpuQuery:
    """queryGpus() in a daemon thread: start() returns at once, result() is None until the answer is in."""

    def __init__(self, timeout=5.0):
        self.timeout = timeout
        self._result = None
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        self._result = queryGpus(self.timeout)

    def result(self):
        return self._result
