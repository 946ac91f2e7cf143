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
    conda:
        "../../environment.yml"
    log:
        f"logs/sft_checkpoint/{SFT}.log",
    shell:
        "python -m sacpo_steps sft_checkpoint --spec {params.spec:q} {params.corpus} --out {output}"
        " --threads {threads} > {log} 2>&1"
