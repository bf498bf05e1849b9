from pathlib import Path

from vlmopt.pipeline import finetune_model, start_job

start_job(snakemake.log[0], snakemake.threads)
finetune_model(
    snakemake.input.model,
    snakemake.output[0],
    settings=snakemake.params.settings,
    train_table=snakemake.input.train,
    dataset_root=Path(snakemake.input.images).parent,
    checkpoint_dir=snakemake.params.checkpoints,
    seed=snakemake.params.seed,
    code=snakemake.params.code,
)
