# vlmopt: data -> finetune -> compress -> infer -> score -> tables -> plots.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/finetune.smk"
include: "rules/compress.smk"
include: "rules/infer.smk"
include: "rules/score.smk"
include: "rules/profile.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        "results/tables/scores.parquet",
        "results/tables/summary.parquet",
        "results/tables/efficiency.parquet",
        "results/plots/quality_vs_size.png",
        "results/plots/task_bars.png",
        "results/plots/quality_vs_cost.png",
        "results/report/index.html",
        # The profiling sweep's figure, in studies that sweep.
        ["results/plots/scaling.png"] if SWEPT else [],
