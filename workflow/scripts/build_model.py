from vlmopt.pipeline import build_model, start_job

start_job(snakemake.log[0], snakemake.threads)
build_model(
    snakemake.params.settings["source"],
    snakemake.output[0],
    settings=snakemake.params.settings,
    tokenizer_table=snakemake.input.tokenizer_table or None,
    seed=snakemake.params.seed,
)
