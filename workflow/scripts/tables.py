from pathlib import Path

from vlmopt.pipeline import build_tables, start_job

start_job(snakemake.log[0], snakemake.threads)
build_tables(
    snakemake.input.scores,
    snakemake.input.models,
    Path(snakemake.output.summary).parent,
    profile_files=[*snakemake.input.profiles, *snakemake.input.sweeps],
)
