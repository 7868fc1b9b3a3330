"""A small pool of killable worker processes that runs one function per item under a hard deadline.

Why processes and not threads or math-verify's own timeout: math-verify (huggingface/Math-Verify)
guards ``parse``/``verify`` with ``signal.alarm``, which only works in the main thread, has a
1-second granularity, and cannot interrupt C-level work (a policy that boxes ``10^{10^{10^{10}}}``
makes sympy/GMP build a multi-gigabyte integer). A process can always be killed, so each item runs
in a worker, and a worker that misses its deadline is SIGKILLed and replaced.

Design choices:
- Start method ``forkserver`` (fallback ``spawn``): the fork comes from a clean single-threaded
  server, never from a trainer process holding torch/OpenMP threads, where ``fork`` can deadlock.
  The server preloads ``math_verify`` so replacing a killed worker costs a fork (~10 ms measured),
  not an interpreter start plus a sympy import (~0.5 s). Measured on 2 CPU cores: the first start
  (forkserver + preload + 2 workers) ~0.5 s, a round trip ~0.07 ms plus math-verify's own time
  (~2 ms for numbers, ~10–25 ms for symbolic answers).
- Workers start lazily, live across calls, and do not outlive their owner: an idle worker exits on
  EOF of its pipe or when the owner's pid is gone; a worker busy in C code when the owner dies is
  stopped by the kernel through a per-item CPU-time limit (RLIMIT_CPU, a backstop well above
  ``timeout_s``), since no Python-level watchdog runs while C code holds the GIL. The forkserver
  exits once the owner and all its children are gone. ``daemon=True`` covers normal interpreter
  exit, and ``PR_SET_PDEATHSIG`` covers the ``spawn`` fallback (where the owner is the parent).
- Each worker may grow its address space by at most ``memory_limit_mb`` (RLIMIT_AS), so a runaway
  big-integer allocation fails with MemoryError in the worker instead of pushing the machine into
  swap.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

_PRELOAD = ["math_verify", "r1v3.rewards.accuracy"]
_preload_set = False
_start_lock = threading.Lock()


@dataclass(frozen=True)
class Outcome:
    """``status`` is ``"ok"`` (then ``value`` is the function's result), ``"timeout"`` or
    ``"error"`` (an exception or a crashed worker; ``value`` is a short reason)."""
    status: str
    value: Any = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG, see prctl(2)
    except (OSError, AttributeError):
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _set_limit(which: str, soft: int, hard: int | None = None) -> None:
    try:
        import resource

        kind = getattr(resource, which)
        resource.setrlimit(kind, (soft, resource.getrlimit(kind)[1] if hard is None else hard))
    except (ImportError, AttributeError, ValueError, OSError):
        pass


def _cpu_backstop(seconds: int) -> None:
    """Let the kernel kill this worker (SIGXCPU) once the current item has used ``seconds`` more
    CPU time than the worker has so far."""
    try:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        _set_limit("RLIMIT_CPU", int(usage.ru_utime + usage.ru_stime) + seconds)
    except (ImportError, OSError):
        pass


def _mapped_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _worker_main(conn, owner_pid: int, memory_limit_mb: int | None, backstop_s: int) -> None:
    _die_with_parent()
    # Ctrl-C reaches the whole process group; the owner decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_limit("RLIMIT_CORE", 0, 0)  # a worker killed by the backstop leaves no core file
    if memory_limit_mb:
        # Relative to what is mapped already: a forkserver that someone else started may carry
        # large libraries, and a limit below the current size would fail every allocation.
        limit = _mapped_bytes() + memory_limit_mb * 1024 * 1024
        _set_limit("RLIMIT_AS", limit, limit)
    while True:
        try:
            if not conn.poll(1.0):
                if not _pid_alive(owner_pid):
                    return
                continue
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, fn, args = msg
        _cpu_backstop(backstop_s)
        try:
            reply = (task_id, "ok", fn(*args))
        except BaseException as err:  # noqa: BLE001 - any failure is the item's, not the worker's
            # Only the type name: str() of a failing sympy object can itself hang (Math-Verify notes this).
            reply = (task_id, "error", type(err).__name__)
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return


@contextlib.contextmanager
def _main_hidden():
    """Start children that do not re-import the owner's ``__main__``.

    With spawn and forkserver, every child first re-runs the main script's top-level imports
    (``multiprocessing.spawn.prepare``). For a trainer that is torch + lightning + transformers:
    seconds per worker, longer than the item timeout, so each fresh worker would time out and be
    replaced forever. The forkserver's ``__main__`` preload, meant to avoid this, does not take
    effect on CPython 3.11 (``ForkServer.ensure_running`` looks for a ``main_path`` key that
    ``get_preparation_data`` never sets). Workers need nothing from ``__main__``, so it is hidden
    from the preparation data while a worker starts; the pool's function must therefore live in an
    importable module.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
    with _start_lock:
        try:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
            yield
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


class _Worker:
    def __init__(self, ctx, memory_limit_mb: int | None, backstop_s: int):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main,
                                args=(child_conn, os.getpid(), memory_limit_mb, backstop_s),
                                daemon=True, name="r1v3-reward-worker")
        with _main_hidden():
            self.proc.start()
        child_conn.close()
        self.conn = parent_conn

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=1)
        self.kill()


class VerifierPool:
    """Run ``fn(*args)`` for many argument tuples across ``num_workers`` processes, each call under a
    ``timeout_s`` wall-clock limit. ``fn`` must be a module-level function (pickled by name).

    ``map`` never raises for a bad item: it returns an :class:`Outcome` per item and counts
    ``timeouts``, ``errors`` (exceptions and crashes) and ``restarts``.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 1.0, start_method: str | None = None,
                 memory_limit_mb: int | None = 4096, cpu_backstop_s: int | None = None):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.memory_limit_mb = memory_limit_mb
        # Only matters when the owner cannot enforce timeout_s itself (it died, or is stopped).
        self.cpu_backstop_s = cpu_backstop_s or max(5, math.ceil(10 * self.timeout_s))
        methods = mp.get_all_start_methods()
        self.start_method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
        self.timeouts = self.errors = self.restarts = self.started = 0
        self._workers: list[_Worker | None] = [None] * num_workers
        self._lock = threading.Lock()
        self._closed = False
        self._next_id = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def _context(self):
        global _preload_set
        ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver" and not _preload_set:
            # Only takes effect if the (process-wide) forkserver is not running yet. It replaces
            # the default ["__main__"], which is a no-op on CPython 3.11 (see _main_hidden).
            ctx.set_forkserver_preload(_PRELOAD)
            _preload_set = True
        return ctx

    def _worker(self, slot: int) -> _Worker:
        worker = self._workers[slot]
        if worker is None or not worker.proc.is_alive():
            if worker is not None:
                worker.kill()
                self.restarts += 1
            worker = self._workers[slot] = _Worker(self._context(), self.memory_limit_mb, self.cpu_backstop_s)
            self.started += 1
        return worker

    def _discard(self, slot: int) -> None:
        worker, self._workers[slot] = self._workers[slot], None
        if worker is not None:
            worker.kill()
            self.restarts += 1

    def warmup(self) -> None:
        """Start every worker now instead of at the first call (start-up cost is paid here)."""
        with self._lock:
            self._check_open()
            for slot in range(self.num_workers):
                self._worker(slot)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for slot, worker in enumerate(self._workers):
                if worker is not None:
                    worker.stop()
                    self._workers[slot] = None

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down modules
            pass

    def __getstate__(self) -> dict:
        # A copy in another process gets its own (lazily started) workers.
        state = self.__dict__.copy()
        state.update(_workers=[None] * self.num_workers, _lock=None, _closed=False)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("VerifierPool is closed")

    # -- work ------------------------------------------------------------------------------------
    def map(self, fn: Callable, arg_list: Sequence[tuple]) -> list[Outcome]:
        with self._lock:
            self._check_open()
            return self._map(fn, list(arg_list))

    def _dispatch(self, slot: int, task_id: int, fn: Callable, args: tuple) -> bool:
        for _ in range(2):  # an idle worker may have died (OOM killer, external kill): one retry
            worker = self._worker(slot)
            try:
                worker.conn.send((task_id, fn, args))
                return True
            except (OSError, ValueError):
                self._discard(slot)
        return False

    def _map(self, fn: Callable, arg_list: list[tuple]) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(arg_list)
        pending = deque(range(len(arg_list)))
        busy: dict[int, tuple[int, int, float]] = {}  # slot -> (item index, task id, deadline)
        while pending or busy:
            for slot in range(self.num_workers):
                if slot in busy or not pending:
                    continue
                index = pending.popleft()
                self._next_id += 1
                if self._dispatch(slot, self._next_id, fn, arg_list[index]):
                    busy[slot] = (index, self._next_id, time.monotonic() + self.timeout_s)
                else:
                    self.errors += 1
                    results[index] = Outcome("error", "worker unavailable")
            if not busy:
                continue
            soonest = min(deadline for _, _, deadline in busy.values())
            by_conn = {self._workers[slot].conn: slot for slot in busy}
            for conn in wait(list(by_conn), timeout=max(0.0, soonest - time.monotonic())):
                slot = by_conn[conn]
                index, task_id, _ = busy.pop(slot)
                try:
                    reply_id, status, value = conn.recv()
                    if reply_id != task_id:
                        raise EOFError("stale reply")
                except (EOFError, OSError, ValueError, TypeError):
                    self._discard(slot)  # crashed (segfault, OOM kill) mid-item
                    status, value = "error", "worker died"
                if status != "ok":
                    self.errors += 1
                results[index] = Outcome(status, value)
            now = time.monotonic()
            for slot, (index, _, deadline) in list(busy.items()):
                if now >= deadline:
                    busy.pop(slot)
                    self._discard(slot)
                    self.timeouts += 1
                    results[index] = Outcome("timeout")
        return results  # type: ignore[return-value]
