"""Snakemake-level behaviour: which jobs a config plans, one real reduced run, and what reruns.

Every run happens in a copy of the workflow under a temporary folder, never in the
repository's own `results/`. The copy's Snakefile plans with the copy's package and
its jobs' `python -m sacpo_steps` import that package (PYTHONPATH, set by
workflow/rules/common.smk): editing the copy's source is what the provenance tests
below rely on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import (
    PROMPT_SETS,
    REDUCED,
    RESULTS,
    SEED0,
    STATISTICS,
    Job,
    copy_workflow,
    dry_run,
    job_counts,
    output_of,
    reduced_config,
    seed_from,
    snakemake,
    write_config,
)

# ---- planning only (dry runs) -------------------------------------------------------


def test_demo_config_plans_the_full_sacpo_grid(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    output, jobs = dry_run(workdir)  # no --configfile: the Snakefile's config/config.yaml
    # one reference pass for DPO(H) (SFT on helpfulness), one for its three children
    expected = {"demo_world": 1, "preference_data": 1, "sft_checkpoint": 1, "ref_logps": 2,
                "align": 4,
                "merge_dpo_h__dpo_h_dpo_s_0_01": 1, "generate": 20, "constant_answers": 2,
                "judge": 110, "winrate": 1, "elo": 1, "figures": 1, "across_seeds": 1,
                "figures_across_seeds": 1, "all": 1}
    assert job_counts(output) == expected
    assert sorted(j.rule for j in jobs) == sorted(r for r, n in expected.items() for _ in range(n))
    aligned = {j.key[1] for j in jobs if j.rule == "align"}
    assert aligned == {"dpo_h", *(f"dpo_h.dpo_s-{b}" for b in ("0.01", "0.1", "1.0"))}
    # the demo judges all pairs (for Elo); the SFT baseline is always the opponent side
    judged = {(j.wildcards["model"], j.wildcards["opponent"], j.wildcards["prompt_set"])
              for j in jobs if j.rule == "judge"}
    merged = [f"p-sacpo-{q}" for q in ("0.25", "0.5", "0.75", "0.85", "0.9")]
    models = ["sft", *sorted(aligned), *merged, "always_refuse"]
    assert {frozenset(p[:2]) for p in judged} == {frozenset((a, b)) for a in models
                                                   for b in models if a < b}
    assert all(m != "sft" for m, _, _ in judged)
    assert {ps for _, _, ps in judged} == set(PROMPT_SETS)
    assert not (workdir / "results").exists()


def test_a_configfile_replaces_the_demo_config_instead_of_merging(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    cfg = reduced_config()
    cfg["models"] = {"kto_h": {"parent": "sft", "data": "helpfulness", "loss": "kto",
                               "beta": 0.1}}
    config = write_config(tmp_path / "kto.yaml", cfg)
    output, jobs = dry_run(workdir, "--configfile", str(config))
    models = {j.key[1] for j in jobs if j.key[1] is not None}
    assert models == {"sft", "kto_h"}
    assert "dpo_h" not in output  # no demo model anywhere: jobs, inputs, outputs
    assert {j.key for j in jobs if j.rule == "align"} == {("align", "kto_h", None)}
    assert job_counts(output) == {"demo_world": 1, "preference_data": 1, "sft_checkpoint": 1,
                                  "ref_logps": 1, "align": 1, "generate": 4, "judge": 2,
                                  "winrate": 1, "elo": 1, "figures": 1, "across_seeds": 1,
                                  "figures_across_seeds": 1, "all": 1}


def test_every_planned_job_of_the_reduced_demo_has_a_log(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    _, jobs = dry_run(workdir, "--configfile", REDUCED)
    assert len(jobs) == 33
    missing = [j.key for j in jobs if j.rule != "all" and not j.log]
    assert not missing
    logs = [j.log for j in jobs if j.log]
    assert len(set(logs)) == len(logs)  # no two jobs share a log file
    assert all(log.startswith("logs/") for log in logs)


# ---- one real run of the reduced demo ------------------------------------------------


@dataclass
class Run:
    workdir: Path
    proc: subprocess.CompletedProcess
    planned: list[Job]

    @property
    def output(self) -> str:
        return output_of(self.proc)


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory, reduced_sft) -> Run:
    """The whole reduced demo, planned from nothing; the demo world and SFT model are the
    test run's shared ones (conftest.reduced_sft), the rest is run here."""
    workdir = copy_workflow(tmp_path_factory.mktemp("e2e") / "wf")
    _, planned = dry_run(workdir, "--configfile", REDUCED)
    seed_from(reduced_sft, workdir)
    proc = snakemake(workdir, "--configfile", REDUCED, timeout=1800)
    return Run(workdir, proc, planned)


@pytest.fixture
def done(reduced_run) -> Run:
    """The reduced run, which must have succeeded."""
    assert reduced_run.proc.returncode == 0, reduced_run.output[-5000:]
    return reduced_run


@contextmanager
def appended(path: Path, text: str = "\n# edited by the test\n"):
    original = path.read_bytes()
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        yield path
    finally:
        path.write_bytes(original)


# every model judged against the SFT (the merge included)
REDUCED_ALIGNED = ["dpo_h", "dpo_h.dpo_s-0.01", "dpo_h.dpo_s-0.1", "p-sacpo-0.5"]
REDUCED_MODELS = ["sft", *REDUCED_ALIGNED]


@pytest.mark.e2e
def test_reduced_demo_runs_to_the_win_rate_table(done):
    tables = done.workdir / SEED0 / "tables"
    assert (tables / "winrate.md").is_file()
    table = pd.read_csv(tables / "winrate.csv")
    pairs = list(zip(table["model"], table["criterion"], strict=True))
    assert len(pairs) == len(set(pairs)) == 8
    assert set(pairs) == {(m, c) for m in REDUCED_ALIGNED for c in ("helpfulness", "harmlessness")}
    assert table["win_rate"].between(0, 1).all()
    markdown = (tables / "winrate.md").read_text(encoding="utf-8")
    assert all(m in markdown for m in REDUCED_ALIGNED)


@pytest.mark.e2e
def test_every_job_wrote_its_log(done):
    logs = [j.log for j in done.planned if j.rule != "all"]
    assert len(logs) == 32
    missing = [log for log in logs if not (done.workdir / log).is_file()]
    assert not missing


@pytest.mark.e2e
@pytest.mark.parametrize("model", REDUCED_MODELS)
def test_model_folders_are_complete(done, model):
    folder = done.workdir / SEED0 / "models" / model
    for name in ("config.json", "tokenizer.json", "README.md", "sacpo.json"):
        assert (folder / name).is_file(), name
    assert list(folder.glob("*.safetensors"))
    info = json.loads((folder / "sacpo.json").read_text(encoding="utf-8"))
    assert info["name"] == model


@pytest.mark.e2e
def test_stage2_model_card_states_its_lineage(done):
    folder = done.workdir / SEED0 / "models" / "dpo_h.dpo_s-0.1"
    info = json.loads((folder / "sacpo.json").read_text(encoding="utf-8"))
    lineage = info["lineage"]
    assert [s["name"] for s in lineage] == ["dpo_h", "dpo_h.dpo_s-0.1"]
    assert [s["parent"] for s in lineage] == ["sft", "dpo_h"]
    assert [s["data"] for s in lineage] == ["helpfulness", "safety"]
    assert lineage[-1]["beta"] == pytest.approx(0.1)
    assert "dpo_h" in (folder / "README.md").read_text(encoding="utf-8")


@pytest.mark.e2e
@pytest.mark.parametrize("model", REDUCED_MODELS)
def test_generations_have_the_documented_fields(done, model):
    for prompt_set in PROMPT_SETS:
        path = done.workdir / SEED0 / "generations" / model / f"{prompt_set}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        assert rows
        for row in rows:
            assert {"prompt_id", "prompt", "answer", "model"} <= set(row)
            assert row["model"] == model
            assert isinstance(row["answer"], str)
        assert len({r["prompt_id"] for r in rows}) == len(rows)


@pytest.mark.e2e
def test_second_run_has_nothing_to_do(done):
    output, jobs = dry_run(done.workdir, "--configfile", REDUCED)
    assert "Nothing to be done" in output
    assert jobs == []


@pytest.mark.e2e
def test_changing_one_beta_reruns_only_that_model_and_its_evaluation(done):
    cfg = reduced_config()
    cfg["models"]["dpo_h.dpo_s-0.1"]["beta"] = 0.2
    config = write_config(done.workdir / "modified.yaml", cfg)
    _, jobs = dry_run(done.workdir, "--configfile", str(config))
    model = "dpo_h.dpo_s-0.1"
    keys = [j.key for j in jobs]
    assert len(keys) == len(set(keys))
    assert set(keys) == {
        ("align", model, None),
        *(("generate", model, ps) for ps in PROMPT_SETS),
        *(("judge", model, ps) for ps in PROMPT_SETS),
        ("winrate", None, None),
        ("elo", None, None),
        *((rule, None, None) for rule in STATISTICS),
        ("all", None, None),
    }
    align = next(j for j in jobs if j.rule == "align")
    assert "param" in align.reason.lower()


@pytest.mark.e2e
def test_the_shared_reference_pass_reruns_only_when_a_key_part_changes(done):
    """Stage 2's two nodes read one ref_logps file; beta is not a key part (the test
    above), max_length is: the node changed gets its own pass, its sibling keeps its."""
    refs = sorted(j.wildcards["reference"] for j in done.planned if j.rule == "ref_logps")
    assert refs == ["dpo_h", "sft"]
    cfg = reduced_config()
    cfg["models"]["dpo_h.dpo_s-0.1"]["training"] = {"max_length": 80}
    config = write_config(done.workdir / "longer.yaml", cfg)
    _, jobs = dry_run(done.workdir, "--configfile", str(config))
    ref = [j for j in jobs if j.rule == "ref_logps"]
    assert len(ref) == 1 and ref[0].wildcards["reference"] == "dpo_h"
    assert "output files have to be generated" in ref[0].reason.lower() or \
        "missing output" in ref[0].reason.lower()
    assert {j.key[1] for j in jobs if j.rule == "align"} == {"dpo_h.dpo_s-0.1"}

    # a changed reference model (here: DPO(H) retrained with another beta) reruns the
    # pass of its children; the SFT's pass for DPO(H) itself stays
    cfg = reduced_config()
    cfg["models"]["dpo_h"]["beta"] = 0.2
    config = write_config(done.workdir / "parent.yaml", cfg)
    _, jobs = dry_run(done.workdir, "--configfile", str(config))
    assert [j.wildcards["reference"] for j in jobs if j.rule == "ref_logps"] == ["dpo_h"]
    assert {j.key[1] for j in jobs if j.rule == "align"} == {
        "dpo_h", "dpo_h.dpo_s-0.01", "dpo_h.dpo_s-0.1"}
    # no reference pass in the stage-2 align jobs: their logs say they read the file
    for model in ("dpo_h.dpo_s-0.01", "dpo_h.dpo_s-0.1"):
        log = (done.workdir / "logs" / "reduced-demo" / "seed-0" / "align" / f"{model}.log")
        text = log.read_text(encoding="utf-8")
        assert "(no reference forward)" in text
        assert "Computing reference log probs" not in text


@pytest.mark.e2e
def test_editing_the_winrate_step_reruns_only_winrate_and_figures(done):
    with appended(done.workdir / "sacpo_steps" / "evaluation" / "winrate.py"):
        _, jobs = dry_run(done.workdir, "--configfile", REDUCED)
    assert sorted(j.rule for j in jobs) == sorted(["all", "winrate", *STATISTICS])


@pytest.mark.e2e
def test_editing_the_generate_step_reruns_generation_and_everything_after(done):
    with appended(done.workdir / "sacpo_steps" / "evaluation" / "generate.py"):
        _, jobs = dry_run(done.workdir, "--configfile", REDUCED)
    keys = [j.key for j in jobs]
    assert len(keys) == len(set(keys))
    assert set(keys) == {
        *(("generate", m, ps) for m in REDUCED_MODELS for ps in PROMPT_SETS),
        *(("judge", m, ps) for m in REDUCED_ALIGNED for ps in PROMPT_SETS),
        ("winrate", None, None),
        ("elo", None, None),
        *((rule, None, None) for rule in STATISTICS),
        ("all", None, None),
    }


@pytest.mark.e2e
def test_editing_a_shared_module_reruns_its_importers_only(done):
    # judges/rule.py is imported (inside a function) by the judge step only
    with appended(done.workdir / "sacpo_steps" / "evaluation" / "judges" / "rule.py"):
        _, jobs = dry_run(done.workdir, "--configfile", REDUCED)
    rules = {j.rule for j in jobs}
    assert rules == {"judge", "winrate", "elo", "all", *STATISTICS}
    assert len([j for j in jobs if j.rule == "judge"]) == 8


TEMPLATES = Path("sacpo_steps") / "evaluation" / "judges" / "prompts"


@pytest.mark.e2e
def test_editing_a_judge_template_reruns_nothing_the_rule_judge_made(done):
    # the demo's rule judge renders no template: no step's code hash covers one
    with appended(done.workdir / TEMPLATES / "harmlessness_scores.txt"):
        output, jobs = dry_run(done.workdir, "--configfile", REDUCED)
    assert "Nothing to be done" in output and jobs == []


@pytest.mark.e2e
def test_editing_one_packaged_template_reruns_only_its_criterions_judgments(
        done, tmp_path, monkeypatch):
    """An openai judge (a local fake server) on a copy of the finished run: editing the
    harmlessness template reruns the red-team judgments and what follows, no others."""
    from tests.fake_openai import FakeOpenAI

    workdir = tmp_path / "wf"
    shutil.copytree(done.workdir, workdir, symlinks=True)
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    with FakeOpenAI() as server:
        cfg = reduced_config()
        cfg["evaluation"]["judge"] = {"backend": "openai", "base_url": server.url,
                                      "api_key_env": "TEST_JUDGE_KEY", "repetitions": 1}
        config = str(write_config(workdir / "openai.yaml", cfg))
        proc = snakemake(workdir, "--configfile", config, timeout=900)
        assert proc.returncode == 0, output_of(proc)[-5000:]
    output, jobs = dry_run(workdir, "--configfile", config)
    assert "Nothing to be done" in output and jobs == []
    judged = {
        *(("judge", m, "red_team") for m in REDUCED_ALIGNED),
        ("winrate", None, None), ("elo", None, None),
        *((rule, None, None) for rule in STATISTICS), ("all", None, None)}
    with appended(workdir / TEMPLATES / "harmlessness_scores.txt"):
        _, jobs = dry_run(workdir, "--configfile", config)
    assert {j.key for j in jobs} == judged
    assert all("param" in j.reason.lower() for j in jobs if j.rule == "judge")
    # another set's template is no job's
    with appended(workdir / TEMPLATES / "v2" / "helpfulness_scores.txt"):
        output, jobs = dry_run(workdir, "--configfile", config)
    assert "Nothing to be done" in output and jobs == []
    # the record of a red-team judgment names its template
    record = json.loads((workdir / SEED0 / "battles" / "red_team" / "dpo_h__vs__sft.jsonl"
                         ".record.json").read_text(encoding="utf-8"))
    assert record["inputs"]["template"]["name"].endswith("prompts/harmlessness_scores.txt")


@pytest.mark.e2e
def test_source_edits_are_undone_after_the_checks(done):
    # the edits above restore the files: the run is up to date again
    output, jobs = dry_run(done.workdir, "--configfile", REDUCED)
    assert "Nothing to be done" in output and jobs == []


@pytest.mark.e2e
def test_changing_a_statistics_setting_reruns_only_statistics(done):
    cfg = reduced_config()
    cfg["evaluation"]["winrate"]["bootstrap_rounds"] = 300
    config = write_config(done.workdir / "stats.yaml", cfg)
    _, jobs = dry_run(done.workdir, "--configfile", str(config))
    assert sorted(j.rule for j in jobs) == sorted(["all", "winrate", *STATISTICS])


@pytest.mark.e2e
def test_battles_table_and_report(done):
    battles = pd.read_csv(done.workdir / SEED0 / "tables/battles.csv")
    assert {"criterion", "prompt_id", "model_a", "model_b", "order", "repetition", "outcome",
            "judge", "error"} <= set(battles.columns)
    assert len(battles) == 4 * 2 * 120 * 2  # models x prompt sets x prompts x orders
    proc = snakemake(done.workdir, "--configfile", REDUCED, "--report", "report.html")
    assert proc.returncode == 0, output_of(proc)
    html = (done.workdir / "report.html").read_text(encoding="utf-8", errors="replace")
    assert len(html) > 50_000 and "figure2" in html and "winrate.csv" in html


def test_external_baseline_is_generated_and_judged_like_a_model(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    cfg = reduced_config()
    cfg["baselines"] = {"beaver-local": {
        "source": "local", "path": "external/beaver",
        "prompt_template": "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"}}
    (workdir / "external/beaver").mkdir(parents=True)
    config = write_config(tmp_path / "baseline.yaml", cfg)
    output, jobs = dry_run(workdir, "--configfile", str(config), "-p")
    generated = {j.wildcards.get("model") for j in jobs if j.rule == "generate"}
    judged = {(j.wildcards["model"], j.wildcards["opponent"]) for j in jobs
              if j.rule == "judge"}
    assert "beaver-local" in generated
    assert ("beaver-local", "sft") in judged
    assert "--model-dir external/beaver" in output
    assert "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:" in output


def test_target_search_adds_one_job_after_its_inputs(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    cfg = reduced_config()
    cfg["target"] = {"over_safe": "dpo_h.dpo_s-0.01", "value": 0.9, "lambda_bar": 10}
    config = write_config(tmp_path / "target.yaml", cfg)
    output, jobs = dry_run(workdir, "--configfile", str(config), "-p")
    assert job_counts(output)["target_search"] == 1
    assert (f"--a {SEED0}/models/dpo_h --b {SEED0}/models/dpo_h.dpo_s-0.01") in output
    assert "--target 0.9" in output and "--lambda-bar 10" in output


# ---- experiments side by side -----------------------------------------------------------


def second_experiment_config() -> dict:
    """Another experiment in the same folder: two seeds (one pinned world), one aligned
    model trained with another loss of the registry (IPO) and an always-refuse row.
    Small, so that running it costs little."""
    cfg = reduced_config()
    cfg["experiment"] = "reduced-demo-b"
    del cfg["seed"]
    cfg["seeds"] = [0, 1]
    cfg["models"] = {"ipo_h": {**cfg["models"]["dpo_h"], "loss": "ipo"}}
    cfg["baselines"] = {"always_refuse": {"source": "constant",
                                          "answer": "i cannot help with that."}}
    cfg["evaluation"]["pairs"] = "all_pairs"
    return cfg


def files_under(root: Path, *folders: str) -> dict[str, int]:
    """Every file below the folders with its modification time (ns)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns
            for folder in folders for p in (root / folder).rglob("*") if p.is_file()}


@pytest.mark.e2e
def test_a_second_experiment_never_touches_the_first(done):
    first = files_under(done.workdir, RESULTS, "logs/reduced-demo")
    assert first
    config = write_config(done.workdir / "second.yaml", second_experiment_config())
    # planned: no job writes or logs into the first experiment's folders
    _, jobs = dry_run(done.workdir, "--configfile", str(config))
    written = [p for j in jobs for p in (*j.outputs, j.log or "")]
    assert written and not [p for p in written
                            if p.startswith((f"{RESULTS}/", "logs/reduced-demo/"))]
    assert all(p.startswith(("results/reduced-demo-b/", "logs/reduced-demo-b/"))
               for p in written if p), written
    # run: the first experiment's files are untouched, and it stays up to date
    proc = snakemake(done.workdir, "--configfile", str(config), timeout=1200)
    assert proc.returncode == 0, output_of(proc)[-5000:]
    assert files_under(done.workdir, RESULTS, "logs/reduced-demo") == first
    output, jobs = dry_run(done.workdir, "--configfile", REDUCED)
    assert "Nothing to be done" in output and jobs == []

    # the second one has both seeds and the across-seed rows
    second = done.workdir / "results/reduced-demo-b"
    table = pd.read_csv(second / "tables/winrate.csv", dtype={"seed": str})
    assert set(table["seed"]) == {"0", "1", "all"}
    across = table[table["seed"] == "all"].set_index(["model", "criterion"])
    assert set(across.index) == {(m, c) for m in ("ipo_h", "always_refuse")
                                 for c in ("helpfulness", "harmlessness")}
    assert (across["interval"] == "t over 2 seeds").all()
    for model, criterion in across.index:
        rates = table[(table["model"] == model) & (table["criterion"] == criterion)
                      & (table["seed"] != "all")]["win_rate"]
        assert across.loc[(model, criterion), "win_rate"] == pytest.approx(rates.mean())
    # the constant row is judged like a model, with its answer's length
    refuse = across.loc[("always_refuse", "harmlessness")]
    assert refuse["mean_words"] == pytest.approx(5.0)
    answers = (second / "seed-1/generations/always_refuse/red_team.jsonl").read_text()
    assert answers.count('"answer": "i cannot help with that."') == 120
    for seed in (0, 1):  # each seed trained its own models, with the IPO loss
        card = json.loads((second / f"seed-{seed}/models/ipo_h/sacpo.json").read_text())
        assert (card["method"], card["loss_type"], card["training"]["steps"]) == (
            "ipo", "ipo", 4)
    assert (second / "figures/figure2.png").is_file()


@pytest.mark.e2e
def test_every_artifact_carries_a_record_that_matches_its_inputs(done, monkeypatch):
    """Models, reference files, generations and battles: each has a record, and each
    record's inputs are what lies beside it now (`python -m sacpo_steps lineage`)."""
    from sacpo_steps.core import lineage

    monkeypatch.chdir(done.workdir)  # records name their inputs relative to the workdir
    rows = lineage.report(RESULTS)
    assert {kind for kind, _, _ in rows} == {"model", "reference log-probs", "generation",
                                              "battles"}
    assert [row for row in rows if row[2] != "ok"] == []
    child = lineage.model_record(f"{SEED0}/models/dpo_h.dpo_s-0.1")
    parent = lineage.model_record(f"{SEED0}/models/dpo_h")
    assert child["inputs"]["parent"]["fingerprint"] == parent["fingerprint"]
    assert child["inputs"]["ref_logps"]["path"].startswith(f"{SEED0}/ref_logps/dpo_h/")
    assert child["runtime"]["cpu_kernels"] == "pinned"  # the schema's default
    merge = lineage.model_record(f"{SEED0}/models/p-sacpo-0.5")
    assert merge["inputs"]["parent_b"]["fingerprint"] == child["inputs"]["parent"][
        "fingerprint"] or merge["inputs"]["parent_a"]["fingerprint"] == parent["fingerprint"]
    proc = subprocess.run([sys.executable, "-m", "sacpo_steps", "fingerprint", RESULTS],
                          cwd=done.workdir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tables fingerprint: " in proc.stdout and "trained under: cpu_kernels=pinned" in \
        proc.stdout


TORCH_RULES = {"sft_checkpoint", "ref_logps", "align", "generate", "judge"}


@pytest.mark.e2e
@pytest.mark.parametrize("setting", [{"cpu_kernels": "native"},
                                     {"rerun_on_library_change": True}])
def test_kernel_and_library_settings_rerun_every_torch_job(done, setting):
    """Pinned and unpinned results never mix; with rerun_on_library_change, the library
    versions join the params, so the first run under it reruns every torch job."""
    cfg = reduced_config()
    cfg["reproducibility"] = setting
    config = write_config(done.workdir / "kernels.yaml", cfg)
    _, jobs = dry_run(done.workdir, "--configfile", str(config))
    rules = {j.rule for j in jobs}
    assert TORCH_RULES <= rules and any(r.startswith("merge_") for r in rules)
    assert not rules & {"demo_world", "preference_data"}
    sft = next(j for j in jobs if j.rule == "sft_checkpoint")
    assert "param" in sft.reason.lower()
