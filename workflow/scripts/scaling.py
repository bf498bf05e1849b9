from vlmopt.pipeline import build_scaling_plot, start_job

start_job(snakemake.log[0], snakemake.threads)
build_scaling_plot(snakemake.input.efficiency, snakemake.output[0])
