rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        directory("results/finetuned/{model}/{trained}"),
    log:
        "logs/finetune/{model}/{trained}.log",
    benchmark:
        "logs/benchmark/finetune/{model}/{trained}.tsv"
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("finetune"),
        settings=finetune_settings,
        seed=SEED,
        # Checkpoints live outside the output, so that a killed job's rerun resumes from them.
        checkpoints="results/checkpoints/{model}/{trained}",
    script:
        "../workflow/scripts/finetune.py"
