"""Timestamps of a Flower message's path, for `benchmarks/flower_breakdown.py`: off unless the
environment variable PRIVMED_FLOWER_TRACE names a file, to which every privmed process of the
deployment (the ServerApp, each relay ClientApp) then appends one JSON line per event. A line holds
wall-clock times (`time.time()`), message ids and types, node ids and process ids: never a
message's content. Imports only the standard library (the relay ClientApp starts with it).
"""

from __future__ import annotations

import json
import os
import time

ENV = "PRIVMED_FLOWER_TRACE"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def record(event: str, t: float | None = None, **fields: object) -> None:
    """Append {'ev': event, 't': t (default: now), 'pid': ..., **fields} to the trace file, if
    tracing is on. One write of one line, in append mode, so that processes do not interleave."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"ev": event, "t": time.time() if t is None else t, "pid": os.getpid(), **fields}) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def process_start_time() -> float | None:
    """When this process was created (seconds since the epoch, to the kernel's clock tick), from
    /proc; None where there is no /proc."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age
