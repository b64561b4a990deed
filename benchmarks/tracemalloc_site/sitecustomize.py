"""Where a node's memory goes, for ``benchmarks/open_streams.py --attribute``.

Python imports this module at start-up when its directory is on ``PYTHONPATH``. It does
nothing unless ``QUORUM_ATTRIBUTE_OUT`` names a file and this process's command line contains
``QUORUM_ATTRIBUTE_ONLY`` (a node's config file name, say). Then:

- ``SIGUSR1`` starts ``tracemalloc`` (``QUORUM_ATTRIBUTE_FRAMES`` frames a trace, 30 by default);
- ``SIGUSR2`` takes a snapshot of what was allocated since and is still alive, stops tracing,
  and writes it to ``QUORUM_ATTRIBUTE_OUT`` as JSON: ``[[owner, where, bytes], ...]``.

``owner`` is the library of the innermost frame of an allocation (``quorum``, ``hypercorn``,
``trio``, ``h11``, or a standard module such as ``contextlib``); ``where`` is the innermost
frame inside the ``quorum`` package (``routing/relay.py:180``), which says what Quorum did that
made the library allocate. Tracing slows the process several times over: the RSS figures of a
run with it are not the node's.
"""

from __future__ import annotations

import json
import os
import signal
import sysconfig
import tracemalloc
from collections import Counter
from types import FrameType

_OUT = os.environ.get("QUORUM_ATTRIBUTE_OUT", "")
_ONLY = os.environ.get("QUORUM_ATTRIBUTE_ONLY", "")
_STDLIB = sysconfig.get_paths()["stdlib"] + "/"


def _owner(filename: str) -> str:
    if "/quorum/" in filename and "site-packages" not in filename:
        return "quorum"
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if filename.startswith("<attrs generated"):
        return "trio"  # trio's attrs classes: their __init__ is generated code
    if filename.startswith(_STDLIB):  # json/decoder.py: "json"; contextlib.py: "contextlib"
        return filename[len(_STDLIB) :].split("/", 1)[0].removesuffix(".py")
    return filename


def _start(_signum: int, _frame: FrameType | None) -> None:
    tracemalloc.start(int(os.environ.get("QUORUM_ATTRIBUTE_FRAMES", "30")))


def _write(_signum: int, _frame: FrameType | None) -> None:
    if not tracemalloc.is_tracing():
        return
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    sizes: Counter[tuple[str, str]] = Counter()
    for stat in snapshot.statistics("traceback"):
        frames = list(stat.traceback)  # oldest first
        ours = [f for f in frames if _owner(f.filename) == "quorum"]
        where = (
            f"{ours[-1].filename.rsplit('/quorum/', 1)[1]}:{ours[-1].lineno}"
            if ours
            else "(no quorum frame)"
        )
        key = (_owner(frames[-1].filename), where)
        sizes[key] += stat.size
    rows = [[owner, where, size] for (owner, where), size in sizes.items()]
    rows.sort(key=lambda row: -row[2])
    with open(_OUT + ".part", "w") as out:
        json.dump(rows, out)
    os.replace(_OUT + ".part", _OUT)


def _install() -> None:
    if not _OUT or not _ONLY:
        return
    with open("/proc/self/cmdline", "rb") as cmdline:
        if _ONLY.encode() not in cmdline.read():
            return
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _write)


_install()
