from vlmopt.pipeline import compress_model, start_job

start_job(snakemake.log[0], snakemake.threads)
compress_model(
    snakemake.input.model,
    snakemake.output[0],
    steps=list(snakemake.params.steps),
    data_root="resources/data",
    work_dir=snakemake.params.work,
    code=snakemake.params.code,
    share=snakemake.params.share,
)
