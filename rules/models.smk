rule build_model:
    input:
        tokenizer_table=tokenizer_table,
    output:
        directory("resources/models/{model}"),
    log:
        "logs/build_model/{model}.log",
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("build_model"),
        settings=model_settings,
        seed=SEED,
    script:
        "../workflow/scripts/build_model.py"
