rule infer:
    input:
        unpack(split_inputs),
        model="results/models/{model}/{ft}/{variant}",
    output:
        "results/predictions/{model}/{ft}/{variant}/{task}/{dataset}/shard-{shard}.parquet",
    log:
        "logs/infer/{model}/{ft}/{variant}/{task}/{dataset}/{shard}.log",
    benchmark:
        "logs/benchmark/infer/{model}/{ft}/{variant}/{task}/{dataset}/{shard}.tsv"
    conda:
        "../workflow/envs/vlmopt.yaml"
    resources:
        # Processes sharing the job's rows (inference.processes, torchrun): a resource, not a
        # param, since it changes no prediction and must rerun nothing.
        processes=INFERENCE["processes"],
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("infer"),
        settings=generation_settings,
        task_settings=task_settings,
    script:
        "../workflow/scripts/infer.py"


# Merging a few shard files takes a moment of pandas: it runs inside the Snakemake process, with no
# job start-up (seconds of imports) and no cluster submission.
localrules:
    gather_predictions,


rule gather_predictions:
    input:
        unpack(split_inputs),
        shards=shard_files,
    output:
        "results/predictions/{model}/{ft}/{variant}/{task}/{dataset}/predictions.parquet",
    log:
        "logs/gather_predictions/{model}/{ft}/{variant}/{task}/{dataset}.log",
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("gather_predictions"),
    run:
        from vlmopt.pipeline import gather_predictions

        gather_predictions(input.shards, input.table, output[0], log_path=log[0])
