"""Timing and peak-memory helpers shared by every bench.

Time: ``time_calls`` runs a callable ``warmup`` times, then ``repeats`` times, each under
``time.perf_counter``; on CUDA pass ``synchronize=torch.cuda.synchronize`` so that a repeat ends
when the device is done. Benches report the median of the repeats.

Peak memory on CUDA: ``cuda_peak_bytes`` reads the caching allocator's high-water mark
(``torch.cuda.max_memory_allocated``) around one call, minus what was allocated before it.

Peak memory on the CPU. PyTorch keeps no statistics for CPU allocations, so what can be measured is
the process's resident set size (RSS), and it has to be measured with care:

* ``ru_maxrss`` after a warm-up call is useless: the warm-up has already raised the high-water mark
  to the call's own peak, so the measured call shows nothing new. Measuring a cold call instead
  counts one-time costs (OpenMP thread pool, autograd engine, oneDNN state) as the op's memory.
* So each case runs in a fresh process (``run_in_fresh_process``, forked from a fork server that has
  already imported torch and normattn, so a case costs ~0.1 s instead of a ~2 s interpreter start),
  where ``cpu_peak_bytes`` does the following:
  1. the caller first runs the op once at a tiny size, which creates the one-time state;
  2. ``malloc_trim(0)`` hands the heap's free pages back to the kernel, so that the measured call
     cannot reuse pages that are already resident (which would hide its allocations); PyTorch's CPU
     allocator does not cache, so every tensor of the measured call then shows up as new pages;
  3. baseline = current RSS; the kernel's high-water mark is reset to it (writing ``5`` to
     ``/proc/self/clear_refs`` sets ``VmHWM = VmRSS``, Linux >= 4.0);
  4. after the call, peak = ``VmHWM``. ``peak - baseline`` is the most memory the call held at
     once, to the page, including buffers that live for microseconds.
* Where ``clear_refs`` cannot be written, a sampler thread reads ``/proc/self/statm`` every
  0.2 ms during the call instead; it can miss short-lived peaks, so it is a lower bound, and the
  result says which method was used (``"hwm"`` or ``"sampler"``).

RSS counts pages actually touched, so the output tensors the call returns are included (they are
part of what the call needs); memory that is allocated but never written is not. Tensors below
malloc's mmap threshold (up to 32 MiB) come from its heap, which keeps and fragments freed chunks,
so at small sizes the peak can exceed the largest set of live tensors by some MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

_PAGE_SIZE = None
# Imported once by the fork server instead of by every case: the first backward imports sympy (via
# symbolic_shapes) and the first torch.func.jvp imports torch._dynamo, seconds each; the backends
# are imported once too, so that a whole run times one version of them even if their files change
# meanwhile. Importing runs no op, so no thread pool exists yet when the server forks. A module that
# fails to import is skipped by the server and imported (or reported) by the case itself.
_FORK_SERVER_MODULES = [
    "torch",
    "torch.fx.experimental.symbolic_shapes",
    "torch._dynamo",
    "torch.func",
    "normattn",
    "normattn.reference",
    "normattn.ops.flash.blockwise",
    "normattn.ops.beta_linear.chunk",
    "normattn.bench.cpu",
]


def time_calls(
    fn: Callable[[], Any],
    *,
    repeats: int,
    warmup: int = 1,
    synchronize: Callable[[], None] | None = None,
) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Most bytes the CUDA caching allocator held during ``fn()`` beyond what was held before."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _page_size() -> int:
    global _PAGE_SIZE
    if _PAGE_SIZE is None:
        import resource

        _PAGE_SIZE = resource.getpagesize()
    return _PAGE_SIZE


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _page_size()


def release_free_heap() -> None:
    """Give glibc's free heap pages back to the kernel (no-op where there is no malloc_trim)."""
    import gc

    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class _RssSampler(threading.Thread):
    def __init__(self, interval_s: float = 2e-4) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak = current_rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, current_rss_bytes())


def cpu_peak_bytes(fn: Callable[[], Any]) -> tuple[int, str, float]:
    """Peak extra RSS during ``fn()``, the method used (see the module docstring) and the seconds
    ``fn()`` took. Meant for a fresh process in which the op has already run once at a tiny size.
    """
    release_free_heap()
    baseline = current_rss_bytes()
    if _reset_high_water_mark():
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        return max(0, _status_kib("VmHWM") * 1024 - baseline), "hwm", seconds
    sampler = _RssSampler()
    sampler.start()
    try:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    finally:
        peak = sampler.stop()
    return max(0, peak - baseline), "sampler", seconds


def _child_main(connection, fn: Callable[..., Any], args: tuple) -> None:
    import gc

    gc.freeze()  # the imported modules' objects: later collections need not walk them
    try:
        result = fn(*args)
    except BaseException as error:  # report anything, the parent decides
        result = {"status": f"failed: {type(error).__name__}: {error}"}
    connection.send(result)
    connection.close()


_context = None


def _fork_server_context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_FORK_SERVER_MODULES)
    return _context


def run_in_fresh_process(fn: Callable[..., dict], *args: Any, timeout_s: float | None = None) -> dict:
    """``fn(*args)`` in a new process that has imported torch but never computed anything.

    ``fn`` must be a module-level function returning a picklable dict. A child that raises returns
    ``{"status": "failed: ..."}``; one that dies (for instance killed for memory) or runs past
    ``timeout_s`` returns a ``failed`` status with the reason.
    """
    context = _fork_server_context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(sender, fn, args))
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            process.kill()
            process.join()
            return {"status": f"failed: timed out after {timeout_s:.0f} s"}
        return receiver.recv()
    except EOFError:
        process.join()
        return {"status": f"failed: process died (exit code {process.exitcode}; out of memory?)"}
    finally:
        receiver.close()
        process.join()
