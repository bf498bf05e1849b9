from vlmopt.pipeline import gather_predictions, start_job

start_job(snakemake.log[0], snakemake.threads)
gather_predictions(snakemake.input.shards, snakemake.input.table, snakemake.output[0])
