"""Pipeline stages: a job's log and thread share."""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["start_job"]


def start_job(log_path: str | Path, threads: int = 1) -> None:
    """Send stderr and logging to the job's log file and bound torch's threads to the job's share.

    torch is not imported here: jobs that never use it (gathering, scoring, tables) would pay
    seconds of import time for nothing. The thread count goes into ``OMP_NUM_THREADS`` and
    ``MKL_NUM_THREADS``, which torch reads when it is first imported, and into
    ``torch.set_num_threads`` if torch is already loaded. A job that was given a GPU (SLURM's or
    CUDA's variables) stops here if its torch cannot use CUDA
    (:func:`vlmopt.device.require_usable_gpu`).
    """
    import os
    import sys

    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sys.stderr = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the job
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    n = str(max(1, int(threads)))
    os.environ["OMP_NUM_THREADS"] = n
    os.environ["MKL_NUM_THREADS"] = n
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(n))
    gpu_variables = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")
    if any((os.environ.get(name) or "").strip() for name in gpu_variables):
        # Given a GPU: stop now, in the log, if this torch cannot use it (vlmopt.device).
        from vlmopt.device import require_usable_gpu

        require_usable_gpu()
