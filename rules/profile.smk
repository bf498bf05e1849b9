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
    threads: workflow.cores
    params:
        # The library code the job runs (vlmopt.code_digest): an edit to it reruns the job.
        code=code("profile"),
        tasks=profile_tasks,
        settings=PROFILING,
        chain=profile_chain,
    script:
        "../workflow/scripts/profile.py"
