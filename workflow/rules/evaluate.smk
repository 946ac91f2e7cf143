# Generation on every prompt set, pairwise judging, win rates and Elo per seed, then
# the across-seed tables and figures.


rule generate:
    input:
        model=lambda wildcards: model_dir(wildcards.model, wildcards.seed),
        prompts=lambda wildcards: LAYOUT.prompt_set_file(wildcards.prompt_set, wildcards.seed),
    output:
        LAYOUT.generation("{model}", "{prompt_set}"),
    wildcard_constraints:
        # constant baselines have no weights (rule constant_answers)
        model=_one_of([m for m in PLAN.models if m not in CONSTANTS]),
    params:
        spec=lambda wildcards: to_json(PLAN.generation_spec(wildcards.model, wildcards.seed)),
        code=code("generate"),
        reproducibility=REPRODUCIBILITY,
        threads=torch_threads("generate"),
    threads: config["threads"]["generate"]
    resources:
        gpu=resource("generate", "gpu", per="model"),
        mem_mb=resource("generate", "mem_mb", per="model"),
        runtime=resource("generate", "runtime", per="model"),
    conda:
        "../envs/sacpo.yaml"
    log:
        LAYOUT.log("generate", "{model}/{prompt_set}"),
    shell:
        "HF_HUB_OFFLINE=1 python -m sacpo_steps generate --model-dir {input.model} --model-name {wildcards.model}"
        " --prompts {input.prompts} --out {output} --spec {params.spec:q}"
        " --threads {params.threads} > {log} 2>&1"


rule constant_answers:
    input:
        prompts=lambda wildcards: LAYOUT.prompt_set_file(wildcards.prompt_set, wildcards.seed),
    output:
        LAYOUT.generation("{constant}", "{prompt_set}"),
    params:
        answer=lambda wildcards: PLAN.baselines[wildcards.constant]["answer"],
        code=code("constant_answers"),
    conda:
        "../envs/sacpo.yaml"
    log:
        LAYOUT.log("constant_answers", "{constant}/{prompt_set}"),
    shell:
        "python -m sacpo_steps constant_answers --answer {params.answer:q}"
        " --model-name {wildcards.constant} --prompts {input.prompts} --out {output}"
        " > {log} 2>&1"


rule judge:
    input:
        unpack(
            lambda wildcards: PLAN.judge_inputs(
                wildcards.model, wildcards.opponent, wildcards.prompt_set, wildcards.seed
            )
        ),
    output:
        battles=LAYOUT.battle("{prompt_set}", "{model}", "{opponent}"),
        replies=LAYOUT.battle("{prompt_set}", "{model}", "{opponent}", suffix=".replies.jsonl"),
        usage=LAYOUT.battle("{prompt_set}", "{model}", "{opponent}", suffix=".usage.json"),
    params:
        # criterion, judge settings, repetitions, cache and spec: one callable, since
        # each callable param costs Snakemake time per job on every call
        args=lambda wildcards: PLAN.judge_args(wildcards.prompt_set, wildcards.seed),
        # the packaged prompt template the job renders, by its sha256 (openai judge)
        templates=lambda wildcards: PLAN.judge_templates([wildcards.prompt_set]),
        code=code("judge"),
        reproducibility=REPRODUCIBILITY,
    resources:
        judge_api=1,
    conda:
        "../envs/sacpo.yaml"
    log:
        LAYOUT.log("judge", "{prompt_set}/{model}__vs__{opponent}"),
    shell:
        "python -m sacpo_steps judge --candidate {input.candidate} --baseline {input.baseline}"
        " --prompts {input.prompts} {params.args} --out {output.battles}"
        " --out-replies {output.replies} --out-usage {output.usage}"
        " > {log} 2>&1"


rule winrate:
    input:
        battles=lambda wildcards: PLAN.battle_files(wildcards.seed),
    output:
        csv=report(
            LAYOUT.seed_table("winrate.csv"),
            caption="../report/winrate.rst",
            category="Tables",
            subcategory="seed {seed}",
            labels={"table": "win rate vs baseline", "seed": "{seed}"},
        ),
        md=LAYOUT.seed_table("winrate.md"),
        battles=LAYOUT.seed_table("battles.csv"),
    params:
        baseline=PLAN.baseline,
        stats=config["evaluation"]["winrate"],
        seed=lambda wildcards: int(wildcards.seed),
        code=code("winrate"),
    conda:
        "../envs/sacpo.yaml"
    log:
        LAYOUT.log("winrate", "winrate"),
    shell:
        "python -m sacpo_steps winrate --battles {input.battles} --baseline {params.baseline}"
        " --rounds {params.stats[bootstrap_rounds]} --confidence {params.stats[confidence]}"
        " --seed {params.seed} --extra-columns --out-csv {output.csv} --out-md {output.md}"
        " --out-battles {output.battles}"
        " > {log} 2>&1"


rule elo:
    input:
        battles=lambda wildcards: PLAN.battle_files(wildcards.seed),
    output:
        csv=report(
            LAYOUT.seed_table("elo.csv"),
            caption="../report/elo.rst",
            category="Tables",
            subcategory="seed {seed}",
            labels={"table": "Elo", "seed": "{seed}"},
        ),
        md=LAYOUT.seed_table("elo.md"),
        **_family_tables(LAYOUT.seed_table, "../report/elo_families.rst", "seed {seed}", "{seed}"),
    params:
        anchor=PLAN.baseline,
        elo=config["evaluation"]["elo"],
        seed=lambda wildcards: int(wildcards.seed),
        families=to_json(PLAN.families),
        out_families=lambda wildcards, output: (
            f"--out-families-csv {output.families_csv} --out-families-md {output.families_md}"
            if PLAN.families
            else ""
        ),
        code=code("elo"),
    conda:
        "../envs/sacpo.yaml"
    log:
        LAYOUT.log("elo", "elo"),
    shell:
        "python -m sacpo_steps elo --battles {input.battles} --anchor {params.anchor}"
        " --mode {params.elo[mode]} --rounds {params.elo[bootstrap_rounds]}"
        " --confidence {params.elo[confidence]} --seed {params.seed}"
        " --paper-trials {params.elo[paper_trials]} --paper-passes {params.elo[paper_passes]}"
        " --families {params.families:q} --out-csv {output.csv} --out-md {output.md}"
        " {params.out_families} > {log} 2>&1"


rule across_seeds:
    input:
        winrate=expand(LAYOUT.seed_table("winrate.csv"), seed=SEEDS),
        elo=expand(LAYOUT.seed_table("elo.csv"), seed=SEEDS),
        elo_families=expand(LAYOUT.seed_table("elo_families.csv"), seed=SEEDS)
        if PLAN.families
        else [],
    output:
        winrate_csv=report(
            LAYOUT.table("winrate.csv"),
            caption="../report/across_seeds.rst",
            category="Tables",
            subcategory="across seeds",
            labels={"table": "win rate vs baseline", "seed": "all"},
        ),
        winrate_md=LAYOUT.table("winrate.md"),
        elo_csv=report(
            LAYOUT.table("elo.csv"),
            caption="../report/across_seeds.rst",
            category="Tables",
            subcategory="across seeds",
            labels={"table": "Elo", "seed": "all"},
        ),
        elo_md=LAYOUT.table("elo.md"),
        **_family_tables(LAYOUT.table, "../report/across_seeds.rst", "across seeds", "all"),
    params:
        seeds=" ".join(map(str, SEEDS)),
        confidence=config["evaluation"]["winrate"]["confidence"],
        families=lambda wildcards, input, output: (
            f"--elo-families {' '.join(input.elo_families)}"
            f" --out-elo-families-csv {output.families_csv}"
            f" --out-elo-families-md {output.families_md}"
            if PLAN.families
            else ""
        ),
        code=code("across_seeds"),
    conda:
        "../envs/sacpo.yaml"
    log:
        LAYOUT.log("across_seeds", "across_seeds", None),
    shell:
        "python -m sacpo_steps across_seeds --seeds {params.seeds}"
        " --winrate {input.winrate} --elo {input.elo} --confidence {params.confidence}"
        " --out-winrate-csv {output.winrate_csv} --out-winrate-md {output.winrate_md}"
        " --out-elo-csv {output.elo_csv} --out-elo-md {output.elo_md} {params.families}"
        " > {log} 2>&1"


rule figures:
    input:
        winrate=LAYOUT.seed_table("winrate.csv"),
        elo=LAYOUT.seed_table("elo.csv"),
        model_info=config["evaluation"]["figures"]["model_info"] or [],
    output:
        [
            report(LAYOUT.seed_figure(name), caption=f"../report/{Path(name).stem}.rst",
                   category="Figures", subcategory="seed {seed}",
                   labels={"figure": Path(name).stem, "format": Path(name).suffix[1:],
                           "seed": "{seed}"})
            for name in FIGURE_NAMES
        ],
    params:
        fig=config["evaluation"]["figures"],
        models=lambda wildcards, input: (
            f"--models {input.model_info}" if input.model_info else ""
        ),
        baseline=PLAN.baseline,
        code=code("figures"),
    conda:
        "../envs/sacpo.yaml"
    log:
        LAYOUT.log("figures", "figures"),
    shell:
        "python -m sacpo_steps figures --winrate {input.winrate} --elo {input.elo}"
        " {params.models} --baseline {params.baseline} --elo-mode {params.fig[elo_mode]}"
        " --x-criterion {params.fig[x_criterion]} --y-criterion {params.fig[y_criterion]}"
        " --out {output} > {log} 2>&1"


# The same step on the across-seed tables: points at the mean over seeds, error bars
# from the across-seed interval, every seed's point faint behind.
use rule figures as figures_across_seeds with:
    input:
        winrate=LAYOUT.table("winrate.csv"),
        elo=LAYOUT.table("elo.csv"),
        model_info=config["evaluation"]["figures"]["model_info"] or [],
    output:
        [
            report(LAYOUT.figure(name), caption=f"../report/{Path(name).stem}.rst",
                   category="Figures", subcategory="across seeds",
                   labels={"figure": Path(name).stem, "format": Path(name).suffix[1:],
                           "seed": "all"})
            for name in FIGURE_NAMES
        ],
    log:
        LAYOUT.log("figures", "figures_across_seeds", None),
