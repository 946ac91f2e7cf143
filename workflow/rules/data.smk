# The demo world and the preference data of every source.


rule demo_world:
    output:
        preferences=f"{DEMO_WORLD}/preferences.jsonl",
        sft_corpus=f"{DEMO_WORLD}/sft_corpus.jsonl",
        prompts=expand(f"{DEMO_WORLD}/prompts/{{name}}.jsonl", name=["helpfulness", "red_team"]),
        spec=f"{DEMO_WORLD}/spec.json",
    params:
        world=lambda wildcards: config.get("demo_world", {}),
        sensitive=lambda wildcards: (
            "--sensitive-tasks" if config["demo_world"]["sensitive_tasks"] else ""
        ),
        out_dir=lambda wildcards, output: os.path.dirname(output.preferences),
        code=code("demo_world"),
    conda:
        "../../environment.yml"
    log:
        "logs/demo_world.log",
    shell:
        "python -m sacpo_steps demo_world --out-dir {params.out_dir} --seed {params.world[seed]}"
        " --n-sft-examples {params.world[n_sft_examples]}"
        " --n-preference-pairs {params.world[n_preference_pairs]}"
        " {params.sensitive} > {log} 2>&1"


rule download_dataset:
    output:
        directory("resources/datasets/{source}"),
    params:
        src=lambda wildcards: config["preference_sources"][wildcards.source],
        code=code("download"),
    conda:
        "../../environment.yml"
    log:
        "logs/download_dataset/{source}.log",
    shell:
        "python -m sacpo_steps download --kind dataset --repo-id {params.src[repo_id]:q}"
        " --revision {params.src[revision]:q} --out {output} > {log} 2>&1"


rule preference_data:
    input:
        table=preference_table,
    output:
        directory("results/data/{source}"),
    params:
        src=lambda wildcards: config["preference_sources"][wildcards.source],
        code=code("preference_data"),
    conda:
        "../../environment.yml"
    log:
        "logs/preference_data/{source}.log",
    shell:
        "python -m sacpo_steps preference_data --input {input.table} --out-dir {output}"
        " --split {params.src[split]} --on-bad-row {params.src[on_bad_row]} > {log} 2>&1"


rule fetch_prompt_set:
    output:
        "resources/prompts/{url_prompt_set}.jsonl",
    params:
        ps=lambda wildcards: PROMPT_SETS[wildcards.url_prompt_set],
        id_field=lambda wildcards: (
            f"--id-field {PROMPT_SETS[wildcards.url_prompt_set]['id_field']}"
            if "id_field" in PROMPT_SETS[wildcards.url_prompt_set]
            else ""
        ),
        code=code("prompt_sets"),
    conda:
        "../../environment.yml"
    log:
        "logs/fetch_prompt_set/{url_prompt_set}.log",
    shell:
        "python -m sacpo_steps prompt_set --url {params.ps[url]:q} --name {wildcards.url_prompt_set}"
        " --prompt-field {params.ps[prompt_field]} {params.id_field} --out {output} > {log} 2>&1"
