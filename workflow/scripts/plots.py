from pathlib import Path

from vlmopt.pipeline import build_plots, start_job

start_job(snakemake.log[0], snakemake.threads)
build_plots(snakemake.input.summary, Path(snakemake.output[0]).parent)
