"""How much the profile of one variant moves between repeated runs on the same machine.

Runs ``vlmopt.pipeline.profile_variant`` ``--runs`` times, each in a fresh Python process (as
separate profile jobs would), on a variant folder of a finished study, and prints for each timed
measure the median over runs and the spread, (max - min) / median, in percent. FLOPs and sizes
must not move at all; the script checks that they are identical across runs.

Usage, after ``make demo``, from the repository root:
``python benchmarks/profile_repeatability.py results/models/blip-tiny/full/baseline --task captioning``
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

TIMED = (
    "latency_ms_p50",
    "latency_ms_p95",
    "prefill_ms_p50",
    "decode_ms_per_token_p50",
    "vision_ms_p50",
    "peak_mem_mb",
)
EXACT = ("gflops_per_sample", "gflops_per_token_per_sample", "size_bytes", "params")

ONE_RUN = """
import json, sys
from vlmopt.pipeline import profile_variant
args = json.loads(sys.argv[1])
profile_variant(args["model"], args["tasks"], args["out"], keys=args["keys"], settings=args["settings"])
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", type=Path, help="a variant folder: results/models/<model>/<ft>/<variant>")
    parser.add_argument("--task", default="captioning")
    parser.add_argument("--dataset", type=Path, default=Path("resources/data/shapes"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args()

    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            out = Path(tmp) / f"run{run}.parquet"
            spec = {
                "model": str(args.variant),
                "tasks": {
                    args.task: {
                        "table": str(args.dataset / "test.parquet"),
                        "root": str(args.dataset),
                        "dataset": args.dataset.name,
                        "generation": {"max_new_tokens": args.max_new_tokens, "num_beams": 1},
                    }
                },
                "out": str(out),
                "keys": {"model": "m", "ft": "f", "variant": "v"},
                "settings": {
                    "batch_size": args.batch_size,
                    "warmup": 3,
                    "repeats": args.repeats,
                    "energy_idle_s": 1.0,
                },
            }
            subprocess.run([sys.executable, "-c", ONE_RUN, json.dumps(spec)], check=True, capture_output=True)
            frames.append(pd.read_parquet(out).assign(run=run))
    df = pd.concat(frames)
    values = df.pivot_table(index="measure", columns="run", values="value", aggfunc="first")
    print(
        f"{args.variant} ({args.task}), {args.runs} runs in fresh processes; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'measure':<28} {'median':>10} {'spread %':>9}")
    for measure in TIMED:
        if measure in values.index and values.loc[measure].notna().all():
            row = values.loc[measure]
            spread = (row.max() - row.min()) / row.median() * 100
            print(f"{measure:<28} {row.median():>10.3f} {spread:>9.1f}")
    for measure in EXACT:
        if measure in values.index:
            same = values.loc[measure].nunique(dropna=False) == 1
            print(f"{measure:<28} {values.loc[measure].iloc[0]:>10.4g} {'identical' if same else 'DIFFERS':>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
