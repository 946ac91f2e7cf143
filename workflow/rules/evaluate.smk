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
        battles="results/battles/{prompt_set}/{model}__vs__{opponent}.jsonl",
        replies="results/battles/{prompt_set}/{model}__vs__{opponent}.replies.jsonl",
        usage="results/battles/{prompt_set}/{model}__vs__{opponent}.usage.json",
    params:
        criterion=lambda wildcards: PROMPT_SETS[wildcards.prompt_set]["criterion"],
        judge=judge_config,
        repetitions=lambda wildcards: JUDGES[wildcards.prompt_set]["repetitions"],
        spec=lambda wildcards, input: f"--spec {input.spec}" if "spec" in input.keys() else "",
        cache=judge_cache,
        code=code("judge"),
    resources:
        judge_api=1,
    conda:
        "../../environment.yml"
    log:
        "logs/judge/{prompt_set}/{model}__vs__{opponent}.log",
    shell:
        "python -m sacpo_steps judge --candidate {input.candidate} --baseline {input.baseline}"
        " --prompts {input.prompts} --criterion {params.criterion}"
        " --judge-config {params.judge:q} {params.spec}"
        " --repetitions {params.repetitions} {params.cache} --out {output.battles}"
        " > {log} 2>&1"


rule winrate:
    input:
        battles=battle_files(),
    output:
        csv=report(
            "results/tables/winrate.csv",
            caption="../report/winrate.rst",
            category="Tables",
            labels={"table": "win rate vs baseline"},
        ),
        md="results/tables/winrate.md",
        battles="results/tables/battles.csv",
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
        " --seed {params.seed} --extra-columns --out-csv {output.csv} --out-md {output.md}"
        " --out-battles {output.battles}"
        " > {log} 2>&1"


rule elo:
    input:
        battles=battle_files(),
    output:
        csv=report(
            "results/tables/elo.csv",
            caption="../report/elo.rst",
            category="Tables",
            labels={"table": "Elo"},
        ),
        md="results/tables/elo.md",
    params:
        anchor=PLAN.baseline,
        elo=config["evaluation"]["elo"],
        seed=SEED,
        code=code("elo"),
    conda:
        "../../environment.yml"
    log:
        "logs/elo.log",
    shell:
        "python -m sacpo_steps elo --battles {input.battles} --anchor {params.anchor}"
        " --mode {params.elo[mode]} --rounds {params.elo[bootstrap_rounds]}"
        " --confidence {params.elo[confidence]} --seed {params.seed}"
        " --paper-trials {params.elo[paper_trials]} --paper-passes {params.elo[paper_passes]}"
        " --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"


rule figures:
    input:
        winrate="results/tables/winrate.csv",
        elo="results/tables/elo.csv",
        model_info=config["evaluation"]["figures"]["model_info"] or [],
    output:
        [
            report(path, caption=f"../report/{Path(path).stem}.rst", category="Figures",
                   labels={"figure": Path(path).stem, "format": Path(path).suffix[1:]})
            for path in FIGURES
        ],
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        fig=config["evaluation"]["figures"],
        models=lambda wildcards, input: (
            f"--models {input.model_info}" if input.model_info else ""
        ),
        baseline=PLAN.baseline,
        code=code("figures"),
    conda:
        "../../environment.yml"
    log:
        "logs/figures.log",
    shell:
        "python -m sacpo_steps figures --winrate {input.winrate} --elo {input.elo}"
        " {params.models} --baseline {params.baseline} --elo-mode {params.fig[elo_mode]}"
        " --x-criterion {params.fig[x_criterion]} --y-criterion {params.fig[y_criterion]}"
        " --out-dir {params.out_dir} > {log} 2>&1"
