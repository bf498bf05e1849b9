rule infer:
    input:
        unpack(split_inputs),
        model="results/models/{model}/{ft}/{variant}",
    output:
        "results/predictions/{model}/{ft}/{variant}/{task}/{dataset}/shard-{scatteritem}.parquet",
    log:
        "logs/infer/{model}/{ft}/{variant}/{task}/{dataset}/{scatteritem}.log",
    benchmark:
        "logs/benchmark/infer/{model}/{ft}/{variant}/{task}/{dataset}/{scatteritem}.tsv"
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        settings=generation_settings,
        task_settings=task_settings,
    script:
        "../workflow/scripts/infer.py"


rule gather_predictions:
    input:
        unpack(split_inputs),
        shards=gather.infer(
            "results/predictions/{{model}}/{{ft}}/{{variant}}/{{task}}/{{dataset}}/shard-{scatteritem}.parquet"
        ),
    output:
        "results/predictions/{model}/{ft}/{variant}/{task}/{dataset}/predictions.parquet",
    log:
        "logs/gather_predictions/{model}/{ft}/{variant}/{task}/{dataset}.log",
    conda:
        "../workflow/envs/vlmopt.yaml"
    script:
        "../workflow/scripts/gather_predictions.py"
