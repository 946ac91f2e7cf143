# One rule for every alignment stage: the parent is the initial policy AND the
# reference; `beta` is the node's own coefficient (stage 2: the paper's beta/lambda).


rule align:
    input:
        parent=align_parent,
        data=align_data_dir,
    output:
        directory(model_dir("{aligned}")),
    params:
        spec=align_spec,
        data=align_data_file,
        launcher=launcher,
        checkpoints=align_checkpoint_dir,
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
