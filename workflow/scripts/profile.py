from pathlib import Path

from vlmopt.pipeline import profile_variant, start_job

start_job(snakemake.log[0], snakemake.threads)
w = snakemake.wildcards
tasks = {
    task: {
        **spec,
        "table": snakemake.input[f"table_{task}"],
        "root": str(Path(snakemake.input[f"images_{task}"]).parent),
    }
    for task, spec in snakemake.params.tasks.items()
}
profile_variant(
    snakemake.input.model,
    tasks,
    snakemake.output[0],
    keys={"model": w.model, "ft": w.ft, "variant": w.variant},
    settings=dict(snakemake.params.settings),
    chain=snakemake.params.chain,
    point=dict(snakemake.params.point) if hasattr(snakemake.params, "point") else None,
)
