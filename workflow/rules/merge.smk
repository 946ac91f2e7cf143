# P-SACPO and naive merging: (1 - q) * a + q * b. Every q of one pair (a, b) is
# written in ONE job, one pass over the parents' weights, so the rule is defined
# once per pair, named after it (merge_<a>__<b>); each q is its own model folder and
# plan node.

for _rule_name, _nodes in PLAN.merge_rules().items():

    rule:
        name:
            _rule_name
        input:
            a=model_dir(_nodes[0].parent_a),
            b=model_dir(_nodes[0].parent_b),
        output:
            [directory(model_dir(n.name)) for n in _nodes],
        params:
            name_a=_nodes[0].parent_a,
            name_b=_nodes[0].parent_b,
            outputs=" ".join(
                f"--q {n.q} --out {model_dir(n.name)} --name {n.name}" for n in _nodes
            ),
            members=to_json([{"name": n.name, "q": n.q} for n in _nodes]),
            code=code("merge"),
            reproducibility=REPRODUCIBILITY,
        resources:
            mem_mb=resource("merge", "mem_mb", per=None),
            runtime=resource("merge", "runtime", per=None),
        conda:
            "../envs/sacpo.yaml"
        log:
            LAYOUT.log("merge", _nodes[0].group),
        shell:
            "HF_HUB_OFFLINE=1 python -m sacpo_steps merge --a {input.a} --b {input.b}"
            " --name-a {params.name_a} --name-b {params.name_b} {params.outputs} > {log} 2>&1"


if TARGET:

    rule target_search:
        input:
            unpack(lambda wildcards: PLAN.target_inputs(wildcards.seed)),
        output:
            json=LAYOUT.target("search.json"),
            md=LAYOUT.target("search.md"),
        params:
            target=TARGET,
            name_b=TARGET["over_safe"],
            lambda_bar=lambda wildcards: (
                f"--lambda-bar {TARGET['lambda_bar']}" if TARGET["lambda_bar"] else ""
            ),
            **search_params(),
        threads: config["threads"]["generate"]
        resources:
            judge_api=1,
        conda:
            "../envs/sacpo.yaml"
        log:
            LAYOUT.log("target_search", "target_search"),
        shell:
            "HF_HUB_OFFLINE=1 python -m sacpo_steps target_search --a {input.a} --b {input.b}"
            " --name-b {params.name_b}"
            # the shared arguments (common.smk); an f-string, not `+`, which the linter flags
            f"""{search_args(
                " --target {params.target[value]} --tolerance {params.target[tolerance]}"
                " {params.lambda_bar}",
                "{params.target[measure]}",
            )}"""
