rule compress:
    input:
        unpack(calibration_inputs),
        model=finetuned_model,
    output:
        directory("results/models/{model}/{ft}/{variant}"),
    log:
        "logs/compress/{model}/{ft}/{variant}.log",
    benchmark:
        "logs/benchmark/compress/{model}/{ft}/{variant}.tsv"
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("compress"),
        steps=variant_steps,
    script:
        "../workflow/scripts/compress.py"
