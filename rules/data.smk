rule prepare_dataset:
    output:
        tables=expand("resources/data/{{dataset}}/{split}.parquet", split=SPLITS),
        images=directory("resources/data/{dataset}/images"),
    log:
        "logs/prepare_dataset/{dataset}.log",
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        settings=dataset_settings,
        seed=config.get("seed", 0),
    script:
        "../workflow/scripts/prepare_dataset.py"
