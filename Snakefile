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
        "results/report/index.html",
        # The figures the study has data for (quality vs size and cost and the task bars always;
        # drop-off, SVD, pruning, confusion, examples and the sweep's curves where it has them).
        expand("results/plots/{figure}", figure=FIGURE_FILES),
        # The packed low-bit folders of the quantized variants, where the study asks (export: true).
        [f"results/exported/{m}/{ft}/{v}" for m, ft, v in EXPORTED],
