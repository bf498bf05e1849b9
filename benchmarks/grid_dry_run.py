"""Time ``snakemake --dry-run`` on a study with a 1,728-variant quantization grid.

The size of the BLIP-2 grid study (bits x part x position x role x symmetry x granularity
= 6 x 3 x 8 x 3 x 2 x 2) on one model, with two tasks and two shards: about 15,600 jobs.
Usage: ``python benchmarks/grid_dry_run.py`` from the repository root.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def study() -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    # One model, as in the grid study (BLIP-2), both tasks, the default two shards.
    config["runs"] = [
        {
            "models": ["blip2-tiny"],
            "finetune": ["full"],
            "variants": "all",
            "tasks": {"captioning": "shapes", "vqa": "shapes"},
        }
    ]
    positions = ["first", "middle", "last", "all", ["first", "middle"], ["first", "last"], ["middle", "last"]]
    positions.append(["first", "middle", "last"])
    config["grids"] = {
        "s2": {
            "axes": {
                "bits": [2, 3, 4, 5, 6, 8],
                "part": ["vision", "bridge", "language"],
                "position": positions,
                "role": ["attention", "mlp", "both"],
                "symmetric": [False, True],
                "granularity": ["per_channel", "per_tensor"],
            },
            "steps": [
                {
                    "method": "uniform",
                    "bits": "{bits}",
                    "part": "{part}",
                    "position": "{position}",
                    "role": "{role}",
                    "symmetric": "{symmetric}",
                    "granularity": "{granularity}",
                }
            ],
        }
    }
    return config


def main() -> int:
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.yaml"
        path.write_text(yaml.safe_dump(study()))
        start = time.perf_counter()
        result = subprocess.run(
            [
                snakemake,
                "-s",
                str(REPO / "Snakefile"),
                "--directory",
                tmp,
                "--configfile",
                str(path),
                "--dry-run",
                "--quiet",
                "rules",
                "--cores",
                "2",
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:])
        return 1
    total = [line for line in result.stdout.splitlines() if line.startswith("total")]
    print(f"dry-run of the 1,728-variant grid: {seconds:.1f} s; jobs: {total[0].split()[-1] if total else '?'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
