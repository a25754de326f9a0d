"""Running a two-process CPU (gloo) worker for the distributed tests, with a fresh port per try."""

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker: Path, out: Path, world: int = 2) -> list[tuple[int, str]]:
    """Run ``worker RANK WORLD PORT OUT`` once per rank on a fresh port; (return code, output) per rank."""
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), str(world), port, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(world)
    ]
    return [(proc.returncode, log) for proc, log in ((p, p.communicate(timeout=240)[0]) for p in procs)]


def run_until_rendezvous(worker: Path, out: Path, world: int = 2) -> list[tuple[int, str]]:
    """:func:`run_ranks`, tried again on another port when a rank fails: the free port can be taken by
    another process between choosing it and the rendezvous (gloo then aborts); a failure in prunekit
    fails every time, and the last try's results are returned."""
    for _ in range(3):
        results = run_ranks(worker, out, world)
        if all(code == 0 for code, _ in results):
            break
    return results
