from pathlib import Path

from vlmopt.pipeline import prepare_dataset, start_job

start_job(snakemake.log[0], snakemake.threads)
prepare_dataset(
    snakemake.wildcards.dataset,
    snakemake.params.settings,
    Path(snakemake.output.images).parent,
    seed=snakemake.params.seed,
)
