# Methods side by side (`comparison:` in the config; docs/comparison.md): per seed and
# matched model, a target search for the P-SACPO q at that model's harmlessness; then
# one job for the frontier figure, the training costs, the matched comparisons and the
# dominance table, across seeds.

if PLAN.comparison:
    _MATCH = PLAN.comparison.get("match") or {}

    if _MATCH:

        rule matched_search:
            input:
                unpack(lambda wildcards: PLAN.matched_inputs(wildcards.model, wildcards.seed)),
            output:
                json=LAYOUT.matched("{model}", ".json"),
                md=LAYOUT.matched("{model}", ".md"),
            params:
                name_b=_MATCH.get("over_safe"),
                tolerance=_MATCH.get("tolerance"),
                **search_params(_MATCH["over_safe"]),
            wildcard_constraints:
                model="|".join(map(re.escape, PLAN.matched_models)),
            threads: config["threads"]["generate"]
            resources:
                judge_api=1,
            conda:
                "../envs/sacpo.yaml"
            log:
                LAYOUT.log("target_search", "matched/{model}"),
            shell:
                "HF_HUB_OFFLINE=1 python -m sacpo_steps target_search --a {input.a} --b {input.b}"
                " --name-b {params.name_b}"
                # the shared arguments (common.smk); an f-string, not `+`, which the linter flags
                f"""{search_args(
                    " --target-from {input.table} --target-model {wildcards.model}"
                    " --match-battles {input.battles} --tolerance {params.tolerance}",
                    "harmlessness_winrate",
                )}"""

    rule comparison:
        input:
            winrate=LAYOUT.table("winrate.csv"),
            models=PLAN.comparison_card_dirs(),
            matched=PLAN.comparison_matched(),
        output:
            **{
                name.replace(".", "_"): LAYOUT.comparison(name)
                for name in COMPARISON_FILES
            },
        params:
            cards=lambda wildcards, input: " ".join(f"{d}/sacpo.json" for d in input.models),
            matched=lambda wildcards, input: (
                f"--matched {' '.join(input.matched)}" if input.matched else ""
            ),
            methods=to_json(PLAN.comparison["methods"]),
            baseline=PLAN.baseline,
            confidence=config["evaluation"]["winrate"]["confidence"],
            code=code("comparison"),
        conda:
            "../envs/sacpo.yaml"
        log:
            LAYOUT.log("comparison", "comparison", None),
        shell:
            "python -m sacpo_steps comparison --winrate {input.winrate} --cards {params.cards}"
            " {params.matched} --methods {params.methods:q} --baseline {params.baseline}"
            " --confidence {params.confidence}"
            " --out-frontier-png {output.frontier_png} --out-frontier-svg {output.frontier_svg}"
            " --out-costs-csv {output.costs_csv} --out-costs-md {output.costs_md}"
            " --out-matched-csv {output.matched_csv} --out-matched-md {output.matched_md}"
            " --out-dominance-csv {output.dominance_csv}"
            " --out-dominance-md {output.dominance_md} > {log} 2>&1"
