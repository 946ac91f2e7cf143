"""SACPO pipeline steps: plain functions with small CLIs, called by the Snakemake rules.

The package is split by concern. Each subpackage imports only from those before it
in this order (tests/test_imports.py holds the code to it, and to having no cycles):

    core        errors, file writing, the schema file, folder layout, lineage records,
                reproducibility settings, source hashes
    data        preference-data formats and the preference_data step, the demo world,
                dataset and prompt-set downloads
    models      model folders, tokenization, the TRL adapter (TRL's private names),
                throughput; the SFT checkpoint, model download and merge steps
    training    the loss registry, training settings, the trainer, the shared
                reference pass; the align and ref_logps steps
    evaluation  generation, the judge backends and the judge step, win rates
    reporting   Elo tables, figures, across-seed tables, fingerprints
    research    beyond the pipeline's DAG: the Theorem 1 check, the target search
    plan        the config loaded, the experiment graph, what each rule asks

`sacpo_steps.steps` names the module of each step (`python -m sacpo_steps <step>`)
and imports nothing. Extensions register through stable entry points:
`training.losses.register_loss`, `evaluation.judges.registry.register_backend`,
`data.formats.register_format`.
"""

import time as _time

# `__version__` is read from pyproject.toml, its one home (module `__getattr__` below), so
# that a release changes no code: every step's source hash covers this file.

#: the subpackages in dependency order: each imports only from those before it
LAYERS = ("core", "data", "models", "training", "evaluation", "reporting", "research", "plan")

# Taken when the package is first imported, i.e. right after interpreter start-up:
# the reference for the jobs' start-up times ("first training step after X s").
_PROCESS_START = _time.monotonic()


def seconds_since_start() -> float:
    """Seconds since this process imported the package (about since it started)."""
    return _time.monotonic() - _PROCESS_START


def _version() -> str:
    """The version of this code. Inside a clone, the clone's pyproject.toml (an install
    elsewhere may be another version); an installed wheel, its own metadata."""
    import re
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        text = ""
    found = re.search(r'(?m)^version = "([^"]+)"$', text)
    if found and re.search(r'(?m)^name = "sacpo-steps"$', text):
        return found.group(1)
    from importlib import metadata

    try:
        return metadata.version("sacpo-steps")
    except metadata.PackageNotFoundError:
        return "unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
