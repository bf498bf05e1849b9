"""Peak memory of a whole command and everything it starts (a study run, say): the largest single
process, and the largest sum over the processes alive at once.

The largest single process comes from the kernel (``ru_maxrss`` of the command's waited-for
descendants, exact). The sum is sampled every ``--interval`` seconds over the command's process
tree (psutil), so a peak shorter than the interval can be missed; it is what a machine or a
SLURM allocation running the whole command must hold.

Usage, from the repository root (the default study, as ``make demo`` runs it)::

    python benchmarks/run_memory.py -- make demo
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import threading
import time

import psutil


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of ``process`` and its descendants alive now."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples (default: 0.5)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")

    start = time.perf_counter()
    child = subprocess.Popen(command)
    watched = psutil.Process(child.pid)
    peak = {"bytes": 0, "at": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = tree_rss(watched)
            if now > peak["bytes"]:
                peak.update(bytes=now, at=time.perf_counter() - start)
            done.wait(args.interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    sampler.join()
    seconds = time.perf_counter() - start
    # RUSAGE_CHILDREN: the largest of every process waited for (KiB), the command and its whole tree
    # (each process's figure passes to its parent when the parent waits for it).
    largest = max(usage.ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    code = os.waitstatus_to_exitcode(status)
    print(
        f"\n{' '.join(command)}: exit {code} after {seconds / 60:.1f} min; largest single process "
        f"{largest / 1024:.0f} MiB; largest sum of processes alive at once {peak['bytes'] / 2**20:.0f} MiB "
        f"(at {peak['at'] / 60:.1f} min, sampled every {args.interval:g} s)",
        flush=True,
    )
    sys.exit(code)


if __name__ == "__main__":
    main()
