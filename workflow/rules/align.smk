# One rule for every alignment stage: the parent is the initial policy AND the
# reference; `beta` is the node's own coefficient (stage 2: the paper's beta/lambda).


rule align:
    input:
        parent=lambda wildcards: PLAN.align_parent_dir(wildcards.aligned, wildcards.seed),
        data=lambda wildcards: PLAN.align_data_dir(wildcards.aligned, wildcards.seed),
    output:
        directory(model_dir("{aligned}")),
    params:
        spec=lambda wildcards: to_json(PLAN.align_spec(wildcards.aligned, wildcards.seed)),
        data=lambda wildcards: PLAN.align_data_file(wildcards.aligned, wildcards.seed),
        launcher=lambda wildcards, resources: PLAN.launcher(
            wildcards.aligned, int(getattr(resources, "gpu", 0) or 0)
        ),
        checkpoints=lambda wildcards: PLAN.align_checkpoint_dir(wildcards.aligned, wildcards.seed),
        code=code("align"),
    threads: config["threads"]["align"]
    resources:
        gpu=resource("align", "gpu", 0, per="aligned"),
        cpus_per_gpu=resource("align", "cpus_per_gpu", 8, per="aligned"),
        mem_mb=resource("align", "mem_mb", 16000, per="aligned"),
        runtime=resource("align", "runtime", 240, per="aligned"),
    conda:
        "../../environment.yml"
    log:
        LAYOUT.log("align", "{aligned}"),
    shell:
        "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {params.launcher} align"
        " --parent-dir {input.parent} --data {params.data} --out {output}"
        " --spec {params.spec:q} --checkpoint-dir {params.checkpoints}"
        " --threads {threads} > {log} 2>&1"
