from pathlib import Path

from vlmopt.pipeline import label_dataset, start_job

start_job(snakemake.log[0], snakemake.threads)
label_dataset(
    snakemake.wildcards.dataset,
    snakemake.params.settings,
    Path(snakemake.input.images).parent,
    Path(snakemake.output.images).parent,
    captioner_dir=snakemake.input.get("captioner"),
    work_dir=snakemake.params.work,
    code=snakemake.params.code,
)
