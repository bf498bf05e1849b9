from pathlib import Path

from vlmopt.pipeline import predict_shard, start_job

start_job(snakemake.log[0], snakemake.threads)
paths = (snakemake.input.model, snakemake.input.table, Path(snakemake.input.images).parent, snakemake.output[0])
options = {
    "task": snakemake.wildcards.task,
    "shard": snakemake.wildcards.shard,
    "settings": dict(snakemake.params.settings),
    "task_settings": dict(snakemake.params.task_settings),
}
# inference.processes > 1: torchrun processes on this node share the shard's rows (vlmopt.distributed);
# their output goes to this job's log.
processes = int(getattr(snakemake.resources, "processes", 1))
if processes > 1:
    from vlmopt.distributed import launch_predict_shard

    launch_predict_shard(*paths, **options, processes=processes, threads=snakemake.threads)
else:
    predict_shard(*paths, **options)
