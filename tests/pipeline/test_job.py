"""A workflow job's start: logging to its file, and torch bounded to its threads without importing it."""

from __future__ import annotations

import subprocess
import sys


def test_start_job_bounds_threads_without_importing_torch(tmp_path):
    log = tmp_path / "logs" / "job.log"
    code = (
        "import sys, logging\n"
        "from vlmopt.pipeline import gather_predictions, score_predictions, start_job\n"
        f"start_job({str(log)!r}, 1)\n"
        "assert 'torch' not in sys.modules, 'gathering and scoring jobs must not pay for importing torch'\n"
        "logging.getLogger('vlmopt').info('hello from the job')\n"
        "import torch\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Without the bound torch would take every core (2 or more here).
    assert out.stdout.strip() == "1"
    assert "hello from the job" in log.read_text()
