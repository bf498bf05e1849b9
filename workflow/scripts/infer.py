from pathlib import Path

from vlmopt.pipeline import predict_shard, start_job

start_job(snakemake.log[0], snakemake.threads)
predict_shard(
    snakemake.input.model,
    snakemake.input.table,
    Path(snakemake.input.images).parent,
    snakemake.output[0],
    task=snakemake.wildcards.task,
    shard=snakemake.wildcards.scatteritem,
    settings=dict(snakemake.params.settings),
    task_settings=dict(snakemake.params.task_settings),
)
