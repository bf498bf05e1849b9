checkpoint prepare_dataset:
    output:
        tables=expand("resources/data/{{dataset}}/{split}.parquet", split=SPLITS),
        images=directory("resources/data/{dataset}/images"),
    log:
        "logs/prepare_dataset/{dataset}.log",
    wildcard_constraints:
        dataset=_alternatives(PREPARED),
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("prepare_dataset"),
        settings=dataset_settings,
        seed=SEED,
    script:
        "../workflow/scripts/prepare_dataset.py"


# Real-vs-generated label texts (and the study's exp2_*.csv files) from another dataset's images,
# captioned by a model of the study where one is configured.
checkpoint label_dataset:
    input:
        unpack(label_inputs),
    output:
        tables=expand("resources/data/{{dataset}}/{split}.parquet", split=SPLITS),
        images=directory("resources/data/{dataset}/images"),
        csv=expand(
            "resources/data/{{dataset}}/exp2_{split}_data9.csv",
            split=["train", "test"],
        ),
    log:
        "logs/label_dataset/{dataset}.log",
    wildcard_constraints:
        dataset=_alternatives(LABELED),
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("label_dataset"),
        settings=dataset_settings,
        # Captions and reasons generated so far, outside the output, so that a killed job's rerun
        # resumes them; removed once the labeled dataset is written.
        work="results/checkpoints/label/{dataset}",
    script:
        "../workflow/scripts/label_dataset.py"
