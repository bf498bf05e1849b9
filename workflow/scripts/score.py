from vlmopt.pipeline import score_predictions, start_job

start_job(snakemake.log[0], snakemake.threads)
score_predictions(
    snakemake.input.predictions,
    snakemake.input.table,
    snakemake.output[0],
    keys=dict(snakemake.params.evaluation),
    settings=snakemake.params.settings,
)
