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


# The report's figures, those the study has data for (vlmopt.study.planned_figures): quality
# against size and cost, the bit-width drop-off and its interactive 3-D view, SVD, pruning, the task
# bars, the real-vs-generated confusion matrices, the before/after examples and the profiling
# sweep's curves; one job each, captions and categories from vlmopt.study.FIGURES.
rule figure:
    input:
        summary="results/tables/summary.parquet",
        variants="results/tables/variants.parquet",
        efficiency="results/tables/efficiency.parquet",
    output:
        report(
            "results/plots/{figure}",
            caption="../workflow/report/figure.rst",
            category=figure_category,
        ),
    log:
        "logs/plots/{figure}.log",
    wildcard_constraints:
        figure=_alternatives(FIGURE_FILES),
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("figure"),
        caption=figure_caption,
        # The before/after examples read the predictions and the test images.
        predictions="results/predictions",
        data="resources/data",
    script:
        "../workflow/scripts/figure.py"


# The study's report (vlmopt.report): one self-contained HTML page with every figure the tables
# have data for, a sortable table of every configuration, the best one under size, latency and
# energy budgets, the study file and the versions and commit that produced the scores.
rule html_report:
    input:
        summary="results/tables/summary.parquet",
        variants="results/tables/variants.parquet",
        efficiency="results/tables/efficiency.parquet",
        scores="results/tables/scores.parquet",
        # Embedded as drawn; the figures the study has no data for are named with the reason.
        figures=expand("results/plots/{figure}", figure=FIGURE_FILES),
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
        predictions="results/predictions",
        data="resources/data",
    script:
        "../workflow/scripts/report.py"
