"""Peak memory of inference and finetuning on 2,000 and on 20,000 rows: it should follow the batch, not the split.

Writes the synthetic ``shapes`` dataset with ``--rows`` distinct training and test images (one PNG
per row, as a real dataset has), builds tiny BLIP, and runs as separate processes, once per row
count:

- ``vlmopt infer`` (captioning, the whole table as one shard, batches of ``--batch-size``);
- ``vlmopt finetune`` (``--steps`` steps in batches of ``--batch-size``; a few steps suffice, since a
  split held in memory is read before the first step).

Each process's peak resident set size comes from the kernel (``ru_maxrss`` of ``wait4``), so it
counts everything the process ever held, torch and the model included. The script prints a table
and the ratio of the largest to the smallest row count for each job; the target is a ratio of at
most 1.2.

``--src`` runs the jobs with another checkout's ``src`` folder first on ``PYTHONPATH`` (for example a
``git worktree`` of an older commit), to compare before and after on the same machine.

Usage, from the repository root::

    python benchmarks/memory.py                       # 2,000 and 20,000 rows
    python benchmarks/memory.py --rows 200 2000       # quicker
    python benchmarks/memory.py --src /tmp/old/src    # the same with older code
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from vlmopt.data.synthetic import make_shapes


def run(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``vlmopt <args>`` to its end; (peak RSS in MiB, seconds). A failure stops the benchmark."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "vlmopt.cli", *args], env=env, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"vlmopt {' '.join(args)} failed ({process.returncode}):\n{stderr[-3000:]}")
    return usage.ru_maxrss / 1024, seconds  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 20000], help="row counts (default: 2000 20000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="finetuning steps (default: 10)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--src", type=Path, help="a src folder to run the jobs with instead of the installed vlmopt")
    parser.add_argument("--work", type=Path, help="where the dataset and outputs go (default: a temporary folder)")
    args = parser.parse_args()

    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.src.resolve()), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="vlmopt-memory-") as tmp:
        work = args.work or Path(tmp)
        data = work / "shapes"
        largest = max(args.rows)
        start = time.perf_counter()
        make_shapes(data, n_train=largest, n_val=1, n_test=largest)
        print(f"dataset: {largest} train + {largest} test images in {time.perf_counter() - start:.0f} s", flush=True)
        train, test = pd.read_parquet(data / "train.parquet"), pd.read_parquet(data / "test.parquet")
        model = work / "blip"
        run(["build-model", "tiny:blip", "--out", str(model), "--tokenizer-table", str(data / "train.parquet")], env)

        results = []
        for n in sorted(args.rows):
            test.head(n).to_parquet(data / f"test-{n}.parquet")
            train.head(n).to_parquet(data / f"train-{n}.parquet")
            infer = [
                "infer", str(model), "--table", str(data / f"test-{n}.parquet"), "--task", "captioning",
                "--out", str(work / f"pred-{n}.parquet"), "--dataset-root", str(data), "--device", "cpu",
                "--settings", json.dumps({"batch_size": args.batch_size}),
            ]  # fmt: skip
            settings = {"max_steps": args.steps, "batch_size": args.batch_size, "epochs": 1, "tasks": ["captioning"]}
            finetune = [
                "finetune", str(model), "--out", str(work / f"ft-{n}"),
                "--train-table", str(data / f"train-{n}.parquet"), "--checkpoints",
                str(work / f"ck-{n}"), "--device", "cpu", "--settings", json.dumps(settings),
            ]  # fmt: skip
            for job, command in (("infer", infer), ("finetune", finetune)):
                peak, seconds = run(command, env)
                results.append({"job": job, "rows": n, "peak_rss_mib": peak, "seconds": seconds})
                print(f"{job:9s} {n:>7,d} rows: peak RSS {peak:7.0f} MiB in {seconds:6.1f} s", flush=True)

    table = pd.DataFrame(results)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.0f}"))
    for job, rows in table.groupby("job"):
        rows = rows.sort_values("rows")
        ratio = rows["peak_rss_mib"].iloc[-1] / rows["peak_rss_mib"].iloc[0]
        verdict = "ok" if ratio <= 1.2 else "over the 1.2 target"
        print(f"{job}: {rows['rows'].iloc[-1]:,} rows / {rows['rows'].iloc[0]:,} rows = {ratio:.2f}x ({verdict})")


if __name__ == "__main__":
    main()
