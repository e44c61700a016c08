"""Peak memory since a reset: CUDA's allocator statistics, or on Linux the process's peak RSS.

PyTorch keeps no statistics of CPU allocations. Writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0)
resets the kernel's high-water mark ``VmHWM`` to the current RSS: read later, it is the peak since the
reset, to the page, short-lived buffers included; read right after the reset, it is the baseline."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak: CUDA's allocator statistics, or on Linux the process's peak RSS (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """The peak since ``reset_peak_memory``: bytes and what was measured."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA allocated"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak RSS"
    try:
        import resource
    except ImportError:
        return None, "unavailable"
    # No /proc: the peak of the whole process life, which no reset lowers.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"
