"""The harness of ``gpu_check.py``: sections that survive each other's failures, ``RESULT``
lines, the log under ``$OUT``, per-section time limits, and warning capture with call sites.

Line formats (one fact per line, parsed by :func:`parse_result`):

    RESULT <metric> [key=value ...] <number>          a measurement, e.g.
    RESULT msda.fwd_ms case=encoder dtype=bf16 path=auto 1.23
    RESULT section=<name> status=ok seconds=<s>
    RESULT section=<name> status=failed error=<ExceptionType>   (its traceback printed above)
    RESULT section=<name> status=skipped: <reason>              e.g. "skipped: no CUDA"

Keys and values hold no spaces; other lines of the log are free text.
"""
from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_STATUS = re.compile(r"^RESULT section=(\S+) status=(ok|failed|skipped)(.*)$")
_MEASURE = re.compile(r"^RESULT (\S+)((?: \S+=\S+)*) ([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))$")


class Skipped(Exception):
    """Raised by a section that does not apply here (e.g. ``Skipped("no CUDA")``)."""


class SectionTimeout(BaseException):
    """Raised inside a section at its time limit (a BaseException, so that a section's own
    ``except Exception`` cannot swallow it)."""


def parse_result(line: str) -> Optional[dict]:
    """A ``RESULT`` line as a dict, or None for any other line.

    Returns:
        {"section": name, "status": "ok" | "failed" | "skipped", "detail": rest of the line}
        or {"metric": name, "keys": {key: value}, "value": float}.
    Raises:
        ValueError: a line that starts with ``RESULT `` but fits neither format.
    """
    line = line.rstrip("\n")
    if not line.startswith("RESULT "):
        return None
    m = _STATUS.match(line)
    if m:
        return {"section": m.group(1), "status": m.group(2), "detail": m.group(3).lstrip(": ").strip()}
    m = _MEASURE.match(line)
    if m:
        keys = dict(kv.split("=", 1) for kv in m.group(2).split())
        return {"metric": m.group(1), "keys": keys, "value": float(m.group(3))}
    raise ValueError(f"malformed RESULT line: {line!r}")


def _token(value) -> str:
    text = str(value)
    if not text or re.search(r"\s", text):
        raise ValueError(f"RESULT keys and values need a non-empty value without spaces, got {text!r}")
    return text


def format_number(value) -> str:
    if isinstance(value, bool) or isinstance(value, int):
        return str(int(value))
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}"


class Report:
    """Prints ``RESULT`` lines (to stdout, which :func:`tee_to` may copy into the log) and keeps them."""

    def __init__(self):
        self.lines: List[dict] = []

    def emit(self, line: str) -> None:
        print(line, flush=True)
        parsed = parse_result(line)
        if parsed is not None:
            self.lines.append(parsed)

    def result(self, metric: str, value, **keys) -> None:
        """``RESULT <metric> key=value ... <value>``; value a number (int, float, bool)."""
        kv = "".join(f" {_token(k)}={_token(v)}" for k, v in keys.items())
        self.emit(f"RESULT {_token(metric)}{kv} {format_number(value)}")

    def status(self, section: str, status: str, detail: str = "") -> None:
        sep = ": " if status == "skipped" else " "
        self.emit(f"RESULT section={_token(section)} status={status}{sep + detail if detail else ''}")

    def statuses(self) -> Dict[str, str]:
        return {r["section"]: r["status"] for r in self.lines if "section" in r}

    def to_json(self, path: str) -> None:
        """The lines as strict JSON (a non-finite value as the string "nan" / "inf" / "-inf")."""
        def strict(r):
            v = r.get("value")
            return {**r, "value": str(v)} if isinstance(v, float) and not math.isfinite(v) else r

        with open(path, "w") as f:
            json.dump([strict(r) for r in self.lines], f, indent=1, allow_nan=False)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()

    def fileno(self):  # faulthandler and subprocesses want a real descriptor: the console's
        return self.streams[0].fileno()

    def isatty(self):
        return False


@contextlib.contextmanager
def tee_to(path: Optional[str]):
    """Copies stdout, stderr, log records and fatal-signal tracebacks into ``path`` (None: no copy)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if path is None:
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", buffering=1) as log:
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(old[0], log), _Tee(old[1], log)
        handler.setStream(sys.stdout)
        ours = not faulthandler.is_enabled()  # (pytest, PYTHONFAULTHANDLER: leave theirs alone)
        if ours:
            faulthandler.enable(file=log)
        try:
            yield
        finally:
            if ours:
                faulthandler.disable()
            sys.stdout, sys.stderr = old
            root.removeHandler(handler)
            root.setLevel(old_level)


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raises :class:`SectionTimeout` in the body after ``seconds`` (main thread, POSIX only;
    elsewhere, or with None, no limit)."""
    usable = seconds is not None and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout(f"time limit of {seconds:.0f} s reached")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_section(report: Report, name: str, fn: Callable[[], None], limit_s: Optional[float]) -> str:
    """Runs one section; its failure (exception, time limit) is printed and reported, not raised.

    Returns:
        "ok", "failed" or "skipped".
    """
    print(f"\n===== section {name} (limit {limit_s:.0f} s) =====" if limit_s else f"\n===== section {name} =====",
          flush=True)
    start = time.perf_counter()
    try:
        with time_limit(limit_s):
            fn()
    except Skipped as e:
        report.status(name, "skipped", str(e))
        return "skipped"
    except (Exception, SectionTimeout) as e:
        traceback.print_exc()
        sys.stderr.flush()
        report.status(name, "failed", f"error={type(e).__name__} seconds={time.perf_counter() - start:.1f}")
        return "failed"
    report.status(name, "ok", f"seconds={time.perf_counter() - start:.1f}")
    return "ok"


def run_child(report: Report, name: str, cmd: List[str], limit_s: float) -> str:
    """Runs one section in its own process (``cmd``), copying its output through this one's;
    a crash, hang or missing status line is reported as a failure of that section.

    Returns:
        "ok", "failed" or "skipped".
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen: Dict[str, str] = {}

    def pump():
        for line in proc.stdout:
            parsed = parse_result(line) if line.startswith("RESULT ") else None
            if parsed is not None:
                report.emit(line.rstrip("\n"))
                if "section" in parsed:
                    seen[parsed["section"]] = parsed["status"]
            else:
                sys.stdout.write(line)
                sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's whole session (its NCCL / compile workers too)
        rc = proc.wait()
        print(f"section {name}: killed after {limit_s:.0f} s", flush=True)
    reader.join(timeout=10)
    if name in seen:
        return seen[name]
    report.status(name, "failed", f"error=exit_{rc} seconds={time.perf_counter() - start:.1f}")
    return "failed"


@dataclass
class CapturedWarning:
    """A warning: Python's (``stack`` = where it was raised), a log record (``log:<logger>``), or
    a line that C++ code wrote to the stderr descriptor (``c++``, e.g. from autograd's threads)."""

    message: str
    category: str
    stack: List[traceback.FrameSummary] = field(repr=False)

    @property
    def site(self) -> str:
        if self.stack:
            return call_site(self.stack)
        m = _CPP_WARNING.match(self.message)  # "[W1207 15:35:29.81 reducer.cpp:1529] Warning: ..."
        return f"c++ {m.group(1)}" if m else self.category


_CPP_WARNING = re.compile(r"^(?:\[rank\d+\]:)?\[W\S* \S+ ([^\]]+)\]")


@contextlib.contextmanager
def _stderr_descriptor(found: List[CapturedWarning]):
    """Redirects descriptor 2 into a file for the body; afterwards its warning lines join
    ``found`` and all of it is written to ``sys.stderr`` (and so into the log)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            found.extend(CapturedWarning(line.strip(), "c++", []) for line in text.splitlines()
                         if _CPP_WARNING.match(line) or "Warning:" in line)
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()


@contextlib.contextmanager
def capture_warnings(descriptor: bool = True):
    """Collects every warning raised in the body (each occurrence, not once per place): Python
    warnings with the stack where they were raised, WARNING+ log records, and (``descriptor``)
    the warning lines C++ writes to descriptor 2, which Python's warning machinery never sees
    (e.g. DDP's reducer and sync-debug warnings of the autograd threads). Yields the list of
    :class:`CapturedWarning`, filled as they come (C++ lines when the body ends)."""
    found: List[CapturedWarning] = []

    def show(message, category, filename, lineno, file=None, line=None):
        found.append(CapturedWarning(str(message), category.__name__, traceback.extract_stack()[:-1]))

    class Records(logging.Handler):
        def emit(self, record):
            found.append(CapturedWarning(record.getMessage(), f"log:{record.name}", []))

    handler = Records(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(), (_stderr_descriptor(found) if descriptor else contextlib.nullcontext()):
            warnings.simplefilter("always")
            warnings.showwarning = show
            yield found
    finally:
        logging.getLogger().removeHandler(handler)


def call_site(stack: List[traceback.FrameSummary], repo: str = REPO) -> str:
    """``path:line (function)`` of the innermost frame in ``repo`` (paths relative to it; this
    harness and the warnings module left out), else of the innermost frame outside ``warnings``."""
    skip = (os.path.abspath(__file__), warnings.__file__)
    frames = [f for f in stack if os.path.abspath(f.filename) not in skip]
    ours = [f for f in frames if os.path.abspath(f.filename).startswith(repo + os.sep)
            and "site-packages" not in f.filename]  # a .venv inside the repo is not ours
    f = (ours or frames or stack)[-1]
    path = os.path.relpath(f.filename, repo) if ours else f.filename
    return f"{path}:{f.lineno} ({f.name})"
