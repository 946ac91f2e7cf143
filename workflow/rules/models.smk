# The SFT checkpoint: built (demo), downloaded from the hub, or linked from a folder.


rule sft_checkpoint:
    input:
        corpus=f"{DEMO_WORLD}/sft_corpus.jsonl" if config["sft"]["source"] == "build" else [],
    output:
        directory(model_dir(SFT)),
    params:
        spec=lambda wildcards: sft_spec(),
        corpus=lambda wildcards, input: f"--corpus {input.corpus}" if input.corpus else "",
        code=code("sft"),
    threads: config["threads"]["sft"]
    resources:
        gpu=resource("sft_checkpoint", "gpu", 0, per=None),
        mem_mb=resource("sft_checkpoint", "mem_mb", 16000, per=None),
        runtime=resource("sft_checkpoint", "runtime", 240, per=None),
    conda:
        "../../environment.yml"
    log:
        f"logs/sft_checkpoint/{SFT}.log",
    shell:
        "python -m sacpo_steps sft_checkpoint --spec {params.spec:q} {params.corpus} --out {output}"
        " --threads {threads} > {log} 2>&1"


rule download_model:
    output:
        directory("resources/models/{baseline}"),
    params:
        spec=baseline_spec,
        code=code("sft"),
    conda:
        "../../environment.yml"
    log:
        "logs/download_model/{baseline}.log",
    shell:
        "python -m sacpo_steps sft_checkpoint --spec {params.spec:q} --out {output} > {log} 2>&1"
