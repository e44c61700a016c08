"""The GPU tests run on a CUDA device, or with ``NORMATTN_GPU_DRY_RUN=1`` on the CPU (``support.py``)."""

from __future__ import annotations

import csv
import os

import pytest
from support import DRY_RUN, NO_CUDA_REASON, compiled_kernels


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """A dry run runs on the CPU what the root conftest skips for want of CUDA."""
    if not DRY_RUN:
        return
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.own_markers = [
                marker
                for marker in item.own_markers
                if not (marker.name == "skip" and marker.kwargs.get("reason") == NO_CUDA_REASON)
            ]


def pytest_sessionfinish(session, exitstatus):
    """``make gpu-check``'s correctness stage asks each test process for the kernels it compiled."""
    folder = os.environ.get("NORMATTN_KERNEL_USAGE_DIR")
    if not folder:
        return
    rows = compiled_kernels()
    with open(os.path.join(folder, f"{os.getpid()}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, ["kernel", "warps", "stages", "registers", "spills", "shared_bytes"])
        writer.writeheader()
        writer.writerows(rows)
