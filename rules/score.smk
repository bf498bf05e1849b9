rule score:
    input:
        unpack(split_inputs),
        predictions="results/predictions/{model}/{ft}/{variant}/{task}/{dataset}/predictions.parquet",
    output:
        "results/scores/{model}/{ft}/{variant}/{task}/{dataset}/scores.parquet",
    log:
        "logs/score/{model}/{ft}/{variant}/{task}/{dataset}.log",
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("score"),
        evaluation=score_keys,
        settings=chain_settings,
    script:
        "../workflow/scripts/score.py"
