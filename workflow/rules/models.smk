# The SFT checkpoint (built per seed for the demo, or linked from a folder once per
# experiment) and hub downloads (shared under resources/, keyed by repo and revision).

if config["sft"]["source"] != "hub":

    rule sft_checkpoint:
        input:
            corpus=(
                f"{LAYOUT.world_dir()}/sft_corpus.jsonl"
                if config["sft"]["source"] == "build"
                else []
            ),
        output:
            directory(model_dir(SFT)),
        params:
            # a built SFT depends on its seed; a linked local folder does not
            spec=lambda wildcards: to_json(PLAN.sft_spec(getattr(wildcards, "seed", None))),
            corpus=lambda wildcards, input: f"--corpus {input.corpus}" if input.corpus else "",
            code=code("sft_checkpoint"),
            reproducibility=REPRODUCIBILITY,
            threads=torch_threads("sft"),
        threads: config["threads"]["sft"]
        resources:
            gpu=resource("sft_checkpoint", "gpu", per=None),
            mem_mb=resource("sft_checkpoint", "mem_mb", per=None),
            runtime=resource("sft_checkpoint", "runtime", per=None),
        conda:
            "../envs/sacpo.yaml"
        log:
            LAYOUT.log("sft_checkpoint", SFT,
                       SEED_WILDCARD if config["sft"]["source"] == "build" else None),
        shell:
            "python -m sacpo_steps sft_checkpoint --spec {params.spec:q} {params.corpus}"
            " --out {output} --threads {params.threads} > {log} 2>&1"


rule download_model:
    output:
        directory("resources/models/{hub_model}"),
    params:
        # content only: experiments sharing the snapshot agree on the params
        hub=lambda wildcards: PLAN.hub_download(wildcards.hub_model),
        convert_bin=lambda wildcards: (
            "--convert-bin" if PLAN.hub_download(wildcards.hub_model)["convert_bin"] else ""
        ),
        code=code("download_model"),
    resources:
        mem_mb=resource("sft_checkpoint", "mem_mb", per=None),
    conda:
        "../envs/sacpo.yaml"
    log:
        "logs/resources/download_model/{hub_model}.log",
    shell:
        "python -m sacpo_steps download_model --repo-id {params.hub[repo_id]:q}"
        " --revision {params.hub[revision]:q} {params.convert_bin} --out {output} > {log} 2>&1"
