"""The documentation: a short README, links that resolve, a configuration reference that
matches the code, the workflow catalog's settings, and a version a copy can name."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: pages another change adds: a link to one is accepted while it does not exist yet
#: (drop a name here once its page is in the tree)
PENDING_PAGES: set[str] = set()  # pages linked before they are written (none now)


def pages() -> list[Path]:
    return [README, ROOT / "CHANGELOG.md", ROOT / "config" / "README.md",
            *sorted((ROOT / "docs").glob("*.md"))]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --- the README ----------------------------------------------------------------------

#: what a newcomer types: one command installs and runs the demo, one runs the tests
DEMO_COMMAND = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 '
                '&& pip install -e ".[test]" && snakemake --cores all')
TEST_COMMAND = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 '
                '&& pip install -e ".[test]" && pytest')
FIRST_SCREEN = 40  # lines


def test_the_readme_is_short():
    lines = _text(README).splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move text to docs/"


def test_the_first_screen_has_the_commands_and_links_to_results_beta_and_slurm():
    first = "\n".join(_text(README).splitlines()[:FIRST_SCREEN])
    for command in (DEMO_COMMAND, TEST_COMMAND):
        assert f"    {command}\n" in first, command
    for anchor in ("#where-the-results-land", "#change-a-beta", "#the-papers-experiment-on-slurm"):
        assert f"]({anchor})" in first, anchor


def test_the_readme_commands_pin_the_torch_that_ci_installs():
    ci = re.search(r"pip install --quiet (torch==\S+)", _text(ROOT / ".ci" / "run")).group(1)
    assert f"pip install {ci} " in DEMO_COMMAND
    pin = re.search(r'"torch(>=[^"]+)"', _text(ROOT / "pyproject.toml")).group(1)
    low = pin.split(",")[0].removeprefix(">=")
    assert ci.removeprefix("torch==").startswith(low), (ci, pin)


# --- links ---------------------------------------------------------------------------

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _outside_code(text: str) -> str:
    """`text` without fenced code blocks and code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in _text(path).splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        heading = re.match(r"#{1,6} (.+)", line)
        if heading and not in_fence:
            slug = _slug(heading.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_slugs_follow_githubs_rules():
    assert _slug("The paper's experiment on SLURM") == "the-papers-experiment-on-slurm"
    assert _slug("The demo's wall time (`bench/demo.py`)") == "the-demos-wall-time-benchdemopy"
    assert _slug("One reference pass per sweep (`ref_logps`)") == \
        "one-reference-pass-per-sweep-ref_logps"


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in _LINK.findall(_outside_code(_text(path))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        name = linked.relative_to(ROOT).as_posix() if linked.is_relative_to(ROOT) else linked
        if not linked.exists():
            if name not in PENDING_PAGES:
                problems.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            continue
        if anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{path.relative_to(ROOT)}: {target} (no heading #{anchor})")
    return problems


def test_every_relative_link_and_anchor_resolves():
    problems = [problem for page in pages() for problem in broken_links(page)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_link_check_finds_a_broken_link(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Title\n\n[ok](#title) [no](#gone) [file](b.md)\n"
                                   "`[code](c.md)`\n", encoding="utf-8")
    problems = broken_links(tmp_path / "a.md")
    assert problems == ["a.md: #gone (no heading #gone)", "a.md: b.md (no such file)"]


def test_every_docs_page_is_listed_in_the_readme():
    text = _text(README)
    unlisted = [page.name for page in sorted((ROOT / "docs").glob("*.md"))
                if f"(docs/{page.name})" not in text]
    assert not unlisted, f"pages the README's Read on does not list: {unlisted}"


# --- the configuration reference -----------------------------------------------------


def test_the_configuration_reference_is_up_to_date():
    from sacpo_steps.plan import config_reference

    written = (ROOT / "config" / "README.md").read_text(encoding="utf-8")
    assert written == config_reference.render(), (
        f"config/README.md is out of date; run: {config_reference.WRITE_COMMAND}")


def test_the_configuration_reference_names_every_key_and_entry():
    from sacpo_steps.data.formats import FORMATS
    from sacpo_steps.evaluation.judges.registry import BACKENDS
    from sacpo_steps.plan import config_reference
    from sacpo_steps.plan.loading import config_schema
    from sacpo_steps.training.losses import LOSSES

    text = config_reference.render()
    schema = config_schema()
    for key in schema["properties"]:
        assert f"| `{key}` |" in text or f"| `{key}." in text, key
    for key in schema["$defs"]["training"]["properties"]:
        assert f"| `training.{key}` |" in text, key
    for name in BACKENDS:
        assert f"### `backend: {name}`" in text, name
    for name in LOSSES:
        assert f"| `{name}` |" in text, name
    for name in FORMATS:
        assert f"| `{name}` |" in text, name
    assert config_reference.WRITE_COMMAND in text


def test_the_reference_command_writes_and_checks(tmp_path):
    out = tmp_path / "README.md"
    run = [sys.executable, "-m", "sacpo_steps.plan.config_reference"]
    stale = subprocess.run([*run, "--check", "--output", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert stale.returncode == 1 and "--write" in stale.stderr
    subprocess.run([*run, "--write", "--output", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    fresh = subprocess.run([*run, "--check", "--output", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    assert out.read_text(encoding="utf-8") == (ROOT / "config" / "README.md").read_text(
        encoding="utf-8")


# --- the Snakemake workflow catalog --------------------------------------------------


def test_the_catalog_settings_declare_usage_and_name_files_that_exist():
    settings = yaml.safe_load(_text(ROOT / ".snakemake-workflow-catalog.yml"))
    usage = settings["usage"]
    flags = usage["mandatory-flags"]
    assert isinstance(flags["desc"], str) and flags["desc"].strip()
    assert isinstance(flags["flags"], str | list)
    methods = usage["software-stack-deployment"]
    assert set(methods) <= {"conda", "apptainer", "apptainer+conda", "singularity",
                            "singularity+conda", "report"}
    assert any(methods.values()), "the catalog needs at least one deployment method"
    assert isinstance(usage["report"], bool)
    # the catalog's "standardized usage": workflow/Snakefile, config/README.md, .smk rules
    assert (ROOT / "workflow" / "Snakefile").is_file()
    assert (ROOT / "config" / "README.md").is_file()
    assert list((ROOT / "workflow" / "rules").glob("*.smk"))
    readme = _text(README).lower()
    assert "snakemake" in readme and "workflow" in readme
    for named in re.findall(r"[\w./-]+\.(?:yaml|yml|md)\b", flags["desc"]):
        assert (ROOT / named).is_file(), named
    snakefile = _text(ROOT / "workflow" / "Snakefile")
    if usage["report"]:
        assert re.search(r"^report:", snakefile, re.M)
    if methods.get("conda"):
        rules = "".join(_text(p) for p in (ROOT / "workflow" / "rules").glob("*.smk"))
        assert "conda:" in rules and (ROOT / "workflow" / "envs" / "sacpo.yaml").is_file()


# --- the version ---------------------------------------------------------------------


def _project_version() -> str:
    return re.search(r'(?m)^version = "([^"]+)"$', _text(ROOT / "pyproject.toml")).group(1)


def test_the_version_has_one_home_and_a_changelog_entry():
    import sacpo_steps

    version = _project_version()
    assert sacpo_steps.__version__ == version
    assert "__version__ =" not in _text(ROOT / "sacpo_steps" / "__init__.py")
    assert re.search(rf"(?m)^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$",
                     _text(ROOT / "CHANGELOG.md")), f"CHANGELOG.md has no entry for {version}"


def test_a_copy_names_the_version_it_runs():
    proc = subprocess.run([sys.executable, "-m", "sacpo_steps", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"sacpo-steps {_project_version()} ")
    assert str(ROOT / "sacpo_steps") in proc.stdout


# --- generated results in the README and docs/results.md -------------------------------


def _update_results():
    spec = importlib.util.spec_from_file_location("update_results",
                                                  ROOT / "docs" / "update_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WINRATE = """| model | criterion | seed | win rate |
|---|---|---|---|
| a | helpfulness | 0 | 0.5 |
| a | helpfulness | all | 0.6 |
"""
ELO = """| criterion | mode | model | seed | rating |
|---|---|---|---|---|
| helpfulness | bt | a | all | 1100.0 |
"""


def test_the_results_blocks_are_made_from_the_workflows_tables():
    update = _update_results()
    readme = update.block("README.md", "results/x", WINRATE, ELO)
    results = update.block("docs/results.md", "results/x", WINRATE, ELO)
    assert "| a | helpfulness | all | 0.6 |" in readme and "| 0 |" not in readme
    assert "1100.0" not in readme and "1100.0" in results
    assert "](docs/figure2.png)" in readme and "](figure2.png)" in results
    page = f"before\n{update.START}\nold\n{update.END}\nafter\n"
    assert update.replace_block(page, readme, "p") == f"before\n{readme}\nafter\n"
    with pytest.raises(ValueError, match="once each"):
        update.replace_block("no markers", readme, "p")


def test_the_readme_and_results_page_show_the_same_generated_table():
    """The README's headline table is the win-rate table of docs/results.md's block, as
    docs/update_results.py writes both."""
    update = _update_results()
    blocks = {}
    for page in update.PAGES:
        text = _text(ROOT / page)
        assert text.count(update.START) == 1 and text.count(update.END) == 1, page
        blocks[page] = text[text.index(update.START):text.index(update.END) + len(update.END)]
    tables = re.findall(r"(?:^\|.*\n)+", blocks["docs/results.md"], re.M)
    winrate, elo = tables[0], tables[1]
    results_dir = re.search(r"`(results/[^/]+)/tables/winrate.md`",
                            blocks["docs/results.md"]).group(1)
    for page, shown in blocks.items():
        assert shown == update.block(page, results_dir, winrate, elo), page
