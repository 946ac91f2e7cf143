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

__version__ = "0.1.0"

#: the subpackages in dependency order: each imports only from those before it
LAYERS = ("core", "data", "models", "training", "evaluation", "reporting", "research", "plan")

# Taken when the package is first imported, i.e. right after interpreter start-up:
# the reference for the jobs' start-up times ("first training step after X s").
_PROCESS_START = _time.monotonic()


def seconds_since_start() -> float:
    """Seconds since this process imported the package (about since it started)."""
    return _time.monotonic() - _PROCESS_START
