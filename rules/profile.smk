# Efficiency of every (model, finetune, variant) on each task it is evaluated on: latency,
# throughput, memory, energy, FLOPs and size (vlmopt.profiling.variant), on the task's first dataset.
rule profile:
    input:
        unpack(profile_inputs),
    output:
        "results/profile/{model}/{ft}/{variant}.parquet",
    log:
        "logs/profile/{model}/{ft}/{variant}.log",
    conda:
        "../workflow/envs/vlmopt.yaml"
    # Every core of a local run: no other job shares the machine while this one times.
    threads: lambda wildcards: workflow.cores
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("profile"),
        tasks=profile_tasks,
        settings=PROFILING,
        chain=profile_chain,
    script:
        "../workflow/scripts/profile.py"


# One point of the study's profiling sweep (vlmopt.profiling.sweep): the variant's profile with one
# setting changed (image size, prompt length, batch size, dtype, attention, torch.compile).
rule sweep:
    input:
        unpack(profile_inputs),
    output:
        "results/sweep/{model}/{ft}/{variant}/{point}.parquet",
    log:
        "logs/sweep/{model}/{ft}/{variant}/{point}.log",
    conda:
        "../workflow/envs/vlmopt.yaml"
    # Every core of a local run, as the profile.
    threads: lambda wildcards: workflow.cores
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("sweep"),
        tasks=profile_tasks,
        settings=sweep_settings,
        chain=profile_chain,
        point=sweep_point,
    script:
        "../workflow/scripts/profile.py"
