from pathlib import Path

from vlmopt.pipeline import build_figure, start_job

start_job(snakemake.log[0], snakemake.threads)
out = Path(snakemake.output[0])
build_figure(
    out.name.rsplit(".", 1)[0],
    Path(snakemake.input.summary).parent,
    out,
    predictions=snakemake.params.predictions,
    data=snakemake.params.data,
)
