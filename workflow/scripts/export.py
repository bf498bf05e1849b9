from vlmopt.pipeline import export_model, start_job

start_job(snakemake.log[0], snakemake.threads)
export_model(snakemake.input.model, snakemake.output[0])
