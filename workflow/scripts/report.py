from pathlib import Path

from vlmopt.pipeline import build_html_report, start_job

start_job(snakemake.log[0], snakemake.threads)
build_html_report(
    Path(snakemake.input.summary).parent,
    Path(snakemake.output[0]).parent,
    dict(snakemake.params.study),
    predictions=snakemake.params.predictions,
    data=snakemake.params.data,
    figures=snakemake.input.figures,
)
