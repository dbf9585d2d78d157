"""What the benchmarks share: allocator settings, the peak-RSS reading, memory subprocesses and
the description of the machine a results file records (:func:`results_meta`).

* Timing processes re-execute themselves with the glibc malloc settings of
  :data:`TIMING_MALLOC_ENV` (the ones the official network's baseline was timed with): freed pages
  stay mapped, so every forward does not re-fault its large temporaries.
* Memory is measured in a fresh subprocess per cell, with ``MALLOC_MMAP_THRESHOLD_`` fixed at
  128 KiB: every larger block is mapped on allocation and unmapped on free, so the peak RSS
  follows the peak of the live tensors. (With glibc's default, dynamic threshold, freed blocks
  of a few MiB stay in the heap and the peak RSS of the same code varied by 40 % between runs.)
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

TIMING_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736",
                     "MALLOC_TOP_PAD_": "1073741824"}
MEMORY_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def reexec_for_timing(script: str, no_malloc_env: bool) -> None:
    """Re-execute ``script`` with :data:`TIMING_MALLOC_ENV` unless it is set (or not wanted)."""
    if not no_malloc_env and any(os.environ.get(k) != v for k, v in TIMING_MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, str(Path(script).resolve())] + sys.argv[1:],
                  {**os.environ, **TIMING_MALLOC_ENV})


def maxrss_mib() -> float:
    """Peak RSS of this process image in MiB (``VmHWM``; ``ru_maxrss`` would report a large
    parent's peak in a child, since it survives fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux ``clear_refs``), so
    that a training step's peak is read on its own and not hidden under a larger eval forward's
    (e.g. one that filled the fast path's position-bias cache). False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_memory_child(script: str, args) -> dict:
    """Run ``script --_memory-child ARGS...`` with :data:`MEMORY_MALLOC_ENV`; its last stdout
    line is a JSON dict (NaN values and the error tail if it failed, e.g. out of memory)."""
    cmd = [sys.executable, str(Path(script).resolve()), "--_memory-child", *map(str, args)]
    env = {k: v for k, v in os.environ.items() if k not in TIMING_MALLOC_ENV}
    res = subprocess.run(cmd, capture_output=True, text=True, env={**env, **MEMORY_MALLOC_ENV})
    if res.returncode != 0:
        return {"fwd": float("nan"), "train": float("nan"), "error": res.stderr[-500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def results_meta(torch) -> dict:
    """Date, device, torch version, threads and command line of a run, for its results JSON."""
    import platform
    import time
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": time.strftime("%Y-%m-%d"), "device": f"cpu: {cpu}, {os.cpu_count()} cores",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "command": " ".join([Path(sys.argv[0]).name] + [Path(a).name if a.endswith(".json") else a
                                                              for a in sys.argv[1:]])}
