# One rule for every alignment stage: the parent is the initial policy AND the
# reference; `beta` is the node's own coefficient (stage 2: the paper's beta/lambda).


# The reference pass, once for every node sharing the parent, the data and the
# tokenization (a stage-2 sweep); each node's align job reads the file.
rule ref_logps:
    input:
        reference=lambda wildcards: model_dir(wildcards.reference, wildcards.seed),
        data=lambda wildcards: PLAN.align_data_dir(_ref_reader(wildcards), wildcards.seed),
    output:
        LAYOUT.ref_logps("{reference}", "{ref_key}"),
    params:
        spec=lambda wildcards: to_json(
            PLAN.ref_logps_spec(wildcards.reference, wildcards.ref_key, wildcards.seed)
        ),
        data=lambda wildcards: PLAN.align_data_file(_ref_reader(wildcards), wildcards.seed),
        launcher=lambda wildcards, resources: PLAN.launcher(
            _ref_reader(wildcards), int(getattr(resources, "gpu", 0) or 0)
        ),
        scratch=lambda wildcards: PLAN.ref_logps_scratch(
            wildcards.reference, wildcards.ref_key, wildcards.seed
        ),
        code=code("ref_logps"),
        reproducibility=REPRODUCIBILITY,
        threads=torch_threads("align"),
    threads: config["threads"]["align"]
    resources:
        gpu=ref_resource("gpu"),
        cpus_per_gpu=ref_resource("cpus_per_gpu"),
        mem_mb=ref_resource("mem_mb"),
        runtime=ref_resource("runtime"),
    conda:
        "../envs/sacpo.yaml"
    log:
        LAYOUT.log("ref_logps", "{reference}/{ref_key}"),
    shell:
        "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {params.launcher} ref_logps"
        " --reference-dir {input.reference} --data {params.data} --out {output}"
        " --spec {params.spec:q} --scratch-dir {params.scratch}"
        " --threads {params.threads} > {log} 2>&1"


rule align:
    input:
        parent=lambda wildcards: PLAN.align_parent_dir(wildcards.aligned, wildcards.seed),
        data=lambda wildcards: PLAN.align_data_dir(wildcards.aligned, wildcards.seed),
        ref_logps=lambda wildcards: PLAN.align_ref_logps(wildcards.aligned, wildcards.seed),
    output:
        directory(model_dir("{aligned}")),
    params:
        spec=lambda wildcards: to_json(PLAN.align_spec(wildcards.aligned, wildcards.seed)),
        data=lambda wildcards: PLAN.align_data_file(wildcards.aligned, wildcards.seed),
        launcher=lambda wildcards, resources: PLAN.launcher(
            wildcards.aligned, int(getattr(resources, "gpu", 0) or 0)
        ),
        checkpoints=lambda wildcards: PLAN.align_checkpoint_dir(wildcards.aligned, wildcards.seed),
        ref_logps=lambda wildcards, input: (
            f"--ref-logps {input.ref_logps}" if input.ref_logps else ""
        ),
        code=code("align"),
        reproducibility=REPRODUCIBILITY,
        threads=torch_threads("align"),
    threads: config["threads"]["align"]
    resources:
        gpu=resource("align", "gpu", per="aligned"),
        cpus_per_gpu=resource("align", "cpus_per_gpu", per="aligned"),
        mem_mb=resource("align", "mem_mb", per="aligned"),
        runtime=resource("align", "runtime", per="aligned"),
    conda:
        "../envs/sacpo.yaml"
    log:
        LAYOUT.log("align", "{aligned}"),
    shell:
        "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {params.launcher} align"
        " --parent-dir {input.parent} --data {params.data} --out {output}"
        " --spec {params.spec:q} --checkpoint-dir {params.checkpoints} {params.ref_logps}"
        " --threads {params.threads} > {log} 2>&1"
