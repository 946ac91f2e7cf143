# The demo world and the preference data of every source.


rule demo_world:
    output:
        preferences=f"{LAYOUT.world_dir()}/preferences.jsonl",
        sft_corpus=f"{LAYOUT.world_dir()}/sft_corpus.jsonl",
        prompts=expand(f"{LAYOUT.world_dir()}/prompts/{{name}}.jsonl",
                       name=["helpfulness", "red_team"], allow_missing=True),
        spec=f"{LAYOUT.world_dir()}/spec.json",
    params:
        world=lambda wildcards: config.get("demo_world", {}),
        # the run's seed, unless demo_world.seed pins one world
        seed=lambda wildcards: LAYOUT.world_seed_for(getattr(wildcards, "seed", 0)),
        sensitive=lambda wildcards: (
            "--sensitive-tasks" if config["demo_world"]["sensitive_tasks"] else ""
        ),
        code=code("demo_world"),
    conda:
        "../envs/sacpo.yaml"
    log:
        LAYOUT.log("demo_world", "demo_world", SEED_WILDCARD if LAYOUT.world_follows_seed else None),
    shell:
        "python -m sacpo_steps demo_world --out-preferences {output.preferences}"
        " --out-sft-corpus {output.sft_corpus} --out-prompts {output.prompts}"
        " --out-spec {output.spec} --seed {params.seed}"
        " --n-sft-examples {params.world[n_sft_examples]}"
        " --n-preference-pairs {params.world[n_preference_pairs]}"
        " {params.sensitive} > {log} 2>&1"


rule download_dataset:
    output:
        directory("resources/datasets/{hub_dataset}"),
    params:
        # content only: experiments sharing the snapshot must agree on its params
        hub=lambda wildcards: PLAN.dataset_download(wildcards.hub_dataset),
        code=code("download_dataset"),
    conda:
        "../envs/sacpo.yaml"
    log:
        "logs/resources/download_dataset/{hub_dataset}.log",
    shell:
        "python -m sacpo_steps download_dataset --repo-id {params.hub[repo_id]:q}"
        " --revision {params.hub[revision]:q} --out {output} > {log} 2>&1"


rule preference_data:
    input:
        table=lambda wildcards: LAYOUT.preference_table(wildcards.source, wildcards.seed),
    output:
        directory(LAYOUT.data_dir("{source}")),
    params:
        src=lambda wildcards: config["preference_sources"][wildcards.source],
        # the table itself, or its `data_dir` sub-folder
        path=lambda wildcards: PLAN.preference_input(wildcards.source, wildcards.seed),
        format=lambda wildcards: PLAN.preference_format_args(wildcards.source),
        code=code("preference_data"),
    conda:
        "../envs/sacpo.yaml"
    log:
        LAYOUT.log("preference_data", "{source}"),
    shell:
        "python -m sacpo_steps preference_data --input {params.path:q} --out-dir {output}"
        " --split {params.src[split]} --on-bad-row {params.src[on_bad_row]} {params.format}"
        " > {log} 2>&1"


rule fetch_prompt_set:
    output:
        "resources/prompts/{prompt_key}/{url_prompt_set}.jsonl",
    params:
        # content only (the url and fields), as in the content key of the folder
        url=lambda wildcards: PROMPT_SETS[wildcards.url_prompt_set]["url"],
        prompt_field=lambda wildcards: PROMPT_SETS[wildcards.url_prompt_set]["prompt_field"],
        id_field=lambda wildcards: (
            f"--id-field {PROMPT_SETS[wildcards.url_prompt_set]['id_field']}"
            if "id_field" in PROMPT_SETS[wildcards.url_prompt_set]
            else ""
        ),
        code=code("fetch_prompt_set"),
    conda:
        "../envs/sacpo.yaml"
    log:
        "logs/resources/fetch_prompt_set/{prompt_key}/{url_prompt_set}.log",
    shell:
        "python -m sacpo_steps fetch_prompt_set --url {params.url:q} --name {wildcards.url_prompt_set}"
        " --prompt-field {params.prompt_field} {params.id_field} --out {output} > {log} 2>&1"
