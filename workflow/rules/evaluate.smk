# Generation on every prompt set, pairwise judging against the baseline, win rates.


rule generate:
    input:
        model=lambda wildcards: model_dir(wildcards.model),
        prompts=lambda wildcards: prompt_set_file(wildcards.prompt_set),
    output:
        "results/generations/{model}/{prompt_set}.jsonl",
    params:
        spec=generation_spec,
        code=code("generate"),
    threads: config["threads"]["generate"]
    resources:
        gpu=resource("generate", "gpu", 0, per="model"),
        mem_mb=resource("generate", "mem_mb", 8000, per="model"),
        runtime=resource("generate", "runtime", 60, per="model"),
    conda:
        "../../environment.yml"
    log:
        "logs/generate/{model}/{prompt_set}.log",
    shell:
        "HF_HUB_OFFLINE=1 python -m sacpo_steps generate --model-dir {input.model} --model-name {wildcards.model}"
        " --prompts {input.prompts} --out {output} --spec {params.spec:q}"
        " --threads {threads} > {log} 2>&1"


rule judge:
    input:
        unpack(judge_inputs),
    output:
        battles="results/battles/{prompt_set}/{model}.jsonl",
        replies="results/battles/{prompt_set}/{model}.replies.jsonl",
    params:
        criterion=lambda wildcards: PROMPT_SETS[wildcards.prompt_set]["criterion"],
        judge=lambda wildcards: judge_config(),
        repetitions=config["evaluation"]["judge"]["repetitions"],
        spec=lambda wildcards, input: f"--spec {input.spec}" if "spec" in input.keys() else "",
        code=code("judge"),
    conda:
        "../../environment.yml"
    log:
        "logs/judge/{prompt_set}/{model}.log",
    shell:
        "python -m sacpo_steps judge --candidate {input.candidate} --baseline {input.baseline}"
        " --prompts {input.prompts} --criterion {params.criterion}"
        " --judge-config {params.judge:q} {params.spec}"
        " --repetitions {params.repetitions} --out {output.battles} > {log} 2>&1"


rule winrate:
    input:
        battles=battle_files(),
    output:
        csv="results/tables/winrate.csv",
        md="results/tables/winrate.md",
    params:
        baseline=PLAN.baseline,
        stats=config["evaluation"]["winrate"],
        seed=SEED,
        code=code("winrate"),
    conda:
        "../../environment.yml"
    log:
        "logs/winrate.log",
    shell:
        "python -m sacpo_steps winrate --battles {input.battles} --baseline {params.baseline}"
        " --rounds {params.stats[bootstrap_rounds]} --confidence {params.stats[confidence]}"
        " --seed {params.seed} --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"
