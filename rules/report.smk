rule tables:
    input:
        scores=all_scores,
        models=all_variant_models,
        profiles=all_profiles,
        sweeps=all_sweeps,
    output:
        scores="results/tables/scores.parquet",
        efficiency="results/tables/efficiency.parquet",
        summary="results/tables/summary.parquet",
        variants="results/tables/variants.parquet",
    log:
        "logs/tables/tables.log",
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("tables"),
    script:
        "../workflow/scripts/tables.py"


rule plots:
    input:
        summary="results/tables/summary.parquet",
    output:
        report(
            "results/plots/quality_vs_size.png",
            caption="../workflow/report/quality_vs_size.rst",
            category="Trade-offs",
        ),
        report(
            "results/plots/task_bars.png",
            caption="../workflow/report/task_bars.rst",
            category="Quality",
        ),
        report(
            "results/plots/quality_vs_cost.png",
            caption="../workflow/report/quality_vs_cost.rst",
            category="Trade-offs",
        ),
    log:
        "logs/plots/plots.log",
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("plots"),
    script:
        "../workflow/scripts/plots.py"


# The profiling sweep's curves (numeric axes) and bars (dtype, attention, compile); only in studies
# with a profiling.sweep.
rule scaling:
    input:
        efficiency="results/tables/efficiency.parquet",
    output:
        report(
            "results/plots/scaling.png",
            caption="../workflow/report/scaling.rst",
            category="Efficiency",
        ),
    log:
        "logs/plots/scaling.log",
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("scaling"),
    script:
        "../workflow/scripts/scaling.py"


# The study's report (vlmopt.report): one self-contained HTML page with every figure the tables
# have data for, a sortable table of every configuration, the best one under size, latency and
# energy budgets, the study file and the versions and commit that produced the scores.
rule html_report:
    input:
        summary="results/tables/summary.parquet",
        variants="results/tables/variants.parquet",
        efficiency="results/tables/efficiency.parquet",
        scores="results/tables/scores.parquet",
    output:
        "results/report/index.html",
    log:
        "logs/report/html_report.log",
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("html_report"),
        study=canonical(config),
    script:
        "../workflow/scripts/report.py"
