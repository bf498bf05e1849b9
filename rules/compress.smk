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
        # Progress of long steps (LoRA training, GPTQ, AWQ) outside the output, so that a killed
        # job's rerun resumes it; removed once the variant is saved.
        work="results/checkpoints/compress/{model}/{ft}/{variant}",
        # Weight files that variants have in common, each on disk once (vlmopt.compress.sharing).
        share="results/models/.shared",
    script:
        "../workflow/scripts/compress.py"


rule export:
    input:
        model="results/models/{model}/{ft}/{variant}",
    output:
        directory("results/exported/{model}/{ft}/{variant}"),
    log:
        "logs/export/{model}/{ft}/{variant}.log",
    conda:
        "../workflow/envs/vlmopt.yaml"
    params:
        code=code("export"),
    script:
        "../workflow/scripts/export.py"
