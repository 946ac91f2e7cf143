"""Where every file of an experiment lives: the one home of the folder layout.

    results/<experiment>/seed-<s>/   everything one seed's run writes (world, data,
                                     models, generations, battles, tables, figures)
    results/<experiment>/tables/     across-seed tables (per-seed rows + one row per model)
    results/<experiment>/figures/    across-seed figures
    logs/<experiment>/...            the experiment's logs, per seed where they vary
    resources/                       downloads, shared by every experiment and keyed by
                                     what they contain (hub id + revision, URL), so that
                                     two experiments never fight over one folder

Two configs with different `experiment:` names therefore never plan, rewrite or
delete each other's files. The methods return Snakemake path patterns: with the
default `seed="{seed}"` a path keeps the `{seed}` wildcard; pass a seed to get a
concrete path.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SEED = "{seed}"
#: the comparison step's files under results/<experiment>/comparison/ (`Layout.comparison`)
COMPARISON_FILES = ("frontier.png", "frontier.svg", "costs.csv", "costs.md", "matched.csv",
                    "matched.md", "dominance.csv", "dominance.md")


class SeedError(ValueError):
    """`seed`/`seeds` in the config are not a usable list of seeds."""


def config_seeds(config: Mapping[str, Any]) -> tuple[int, ...]:
    """The run's seeds: `seeds: [0, 1, 2]`, or a scalar `seed: s` meaning `[s]` (default [0])."""
    if "seed" in config and "seeds" in config:
        raise SeedError("seed and seeds: give one of them (a scalar seed means seeds: [seed])")
    raw = config.get("seeds", [config.get("seed", 0)])
    if not isinstance(raw, list) or not raw:
        raise SeedError(f"seeds: expected a non-empty list of integers, got {raw!r}")
    for s in raw:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise SeedError(f"seeds: expected non-negative integers, got {s!r}")
    if len(set(raw)) != len(raw):
        raise SeedError(f"seeds: {raw} lists a seed twice")
    return tuple(raw)


def _slug(text: str) -> str:
    """A folder-safe rendering of a hub id or revision ("org/name" -> "org--name")."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", text.replace("/", "--"))


def hub_key(repo_id: str, revision: str = "main", convert_bin: bool = False) -> str:
    """The folder name of one hub snapshot: what it contains, not who asked for it."""
    key = f"{_slug(repo_id)}@{_slug(revision)}"
    return f"{key}+safetensors" if convert_bin else key


def url_key(spec: Mapping[str, Any]) -> str:
    """The folder of a fetched prompt set: a hash of what defines its content (the file
    inside keeps the set's name, which the judge step reads as the set's name)."""
    fields = {k: spec.get(k) for k in ("url", "prompt_field", "id_field")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Layout:
    """Paths of one experiment; built from a validated config by `from_config`."""

    experiment: str
    seeds: tuple[int, ...]
    sft: str
    sft_spec: Mapping[str, Any]
    baselines: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    prompt_sets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    preference_sources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    world_seed: int | None = None  # a pinned demo world; None: the world follows the seed

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Layout:
        sft = config["sft"]
        return cls(
            experiment=config["experiment"],
            seeds=config_seeds(config),
            sft=sft.get("name", "sft"),
            sft_spec=sft,
            baselines=config.get("baselines", {}),
            prompt_sets=config["evaluation"]["prompt_sets"],
            preference_sources=config["preference_sources"],
            world_seed=config.get("demo_world", {}).get("seed"),
        )

    # ---- roots ---------------------------------------------------------------

    @property
    def root(self) -> str:
        return f"results/{self.experiment}"

    @property
    def log_root(self) -> str:
        return f"logs/{self.experiment}"

    def seed_dir(self, seed: int | str = SEED) -> str:
        return f"{self.root}/seed-{seed}"

    def log(self, kind: str, name: str, seed: int | str | None = SEED) -> str:
        """`logs/<experiment>[/seed-<s>]/<kind>/<name>.log`; seed=None for per-experiment jobs."""
        scope = self.log_root if seed is None else f"{self.log_root}/seed-{seed}"
        return f"{scope}/{kind}/{name}.log"

    def scratch(self, seed: int | str = SEED) -> str:
        """Trainer checkpoints (resumable, not results)."""
        return f"scratch/{self.experiment}/seed-{seed}"

    # ---- the demo world and preference data ------------------------------------

    @property
    def world_follows_seed(self) -> bool:
        return self.world_seed is None

    def world_dir(self, seed: int | str = SEED) -> str:
        return f"{self.seed_dir(seed)}/demo_world" if self.world_follows_seed \
            else f"{self.root}/demo_world"

    def world_seed_for(self, seed: int | str) -> int:
        return int(seed) if self.world_seed is None else int(self.world_seed)

    def dataset_dir(self, source: str) -> str:
        """A hub dataset's snapshot under resources/, keyed by repo id and revision."""
        src = self.preference_sources[source]
        return f"resources/datasets/{hub_key(src['repo_id'], src.get('revision', 'main'))}"

    def hub_datasets(self) -> dict[str, str]:
        """{folder key: source name} of every hub preference source."""
        return {self.dataset_dir(n).rsplit("/", 1)[1]: n
                for n, s in self.preference_sources.items() if s["source"] == "hub"}

    def preference_table(self, source: str, seed: int | str = SEED) -> str:
        src = self.preference_sources[source]
        if src["source"] == "demo":
            return f"{self.world_dir(seed)}/preferences.jsonl"
        if src["source"] == "hub":
            return self.dataset_dir(source)
        return src["path"]

    def data_dir(self, source: str, seed: int | str = SEED) -> str:
        """The converted preference data (a cheap, deterministic step, kept per seed)."""
        return f"{self.seed_dir(seed)}/data/{source}"

    # ---- prompt sets -----------------------------------------------------------

    def prompt_set_file(self, name: str, seed: int | str = SEED) -> str:
        ps = self.prompt_sets[name]
        source = ps.get("source", "local")
        if source == "demo":
            return f"{self.world_dir(seed)}/prompts/{name}.jsonl"
        if source == "url":
            return f"resources/prompts/{url_key(ps)}/{name}.jsonl"
        return ps["path"]

    def url_prompt_sets(self) -> dict[str, str]:
        """{prompt set name: content key} of every fetched prompt set."""
        return {n: url_key(p) for n, p in self.prompt_sets.items() if p.get("source") == "url"}

    # ---- models ------------------------------------------------------------------

    def hub_spec(self, name: str) -> Mapping[str, Any]:
        """The hub section of a hub model (the SFT's `hub`, or a baseline's own keys)."""
        if name == self.sft:
            return self.sft_spec["hub"]
        return self.baselines[name]

    def hub_models(self) -> dict[str, str]:
        """{folder key: model name} of every model downloaded from the hub."""
        names = [n for n, b in self.baselines.items() if b["source"] == "hub"]
        if self.sft_spec["source"] == "hub":
            names.insert(0, self.sft)
        return {self.model_dir(n).rsplit("/", 1)[1]: n for n in names}

    def constant_models(self) -> list[str]:
        return [n for n, b in self.baselines.items() if b["source"] == "constant"]

    @staticmethod
    def _hub_dir(hub: Mapping[str, Any]) -> str:
        key = hub_key(hub["repo_id"], hub.get("revision", "main"), hub.get("convert_bin", False))
        return f"resources/models/{key}"

    def model_dir(self, name: str, seed: int | str = SEED) -> str:
        """A model's folder: downloads under resources/ (shared), a local baseline where
        it is, a local SFT linked once per experiment, the rest per seed."""
        if name == self.sft:
            source = self.sft_spec["source"]
            if source == "hub":
                return self._hub_dir(self.sft_spec["hub"])
            if source == "local":
                return f"{self.root}/models/{name}"
        if name in self.baselines:
            b = self.baselines[name]
            if b["source"] == "hub":
                return self._hub_dir(b)
            if b["source"] == "local":
                return b["path"]
            raise ValueError(f"baselines.{name}: a constant baseline has no model folder")
        return f"{self.seed_dir(seed)}/models/{name}"

    def ref_logps(self, reference: str, key: str, seed: int | str = SEED) -> str:
        """Reference log-probs of `reference` on one dataset (sacpo_steps.training.ref_logps)."""
        return f"{self.seed_dir(seed)}/ref_logps/{reference}/{key}.json"

    # ---- evaluation --------------------------------------------------------------

    def generation(self, model: str, prompt_set: str, seed: int | str = SEED) -> str:
        return f"{self.seed_dir(seed)}/generations/{model}/{prompt_set}.jsonl"

    def battle(self, prompt_set: str, model: str, opponent: str, seed: int | str = SEED,
               suffix: str = ".jsonl") -> str:
        return f"{self.seed_dir(seed)}/battles/{prompt_set}/{model}__vs__{opponent}{suffix}"

    def battle_files(self, pairs: Iterable[tuple[str, str]], seed: int | str = SEED) -> list[str]:
        pairs = list(pairs)
        return [self.battle(ps, m, o, seed) for ps in self.prompt_sets for m, o in pairs]

    def seed_table(self, name: str, seed: int | str = SEED) -> str:
        return f"{self.seed_dir(seed)}/tables/{name}"

    def seed_figure(self, name: str, seed: int | str = SEED) -> str:
        return f"{self.seed_dir(seed)}/figures/{name}"

    def target(self, name: str, seed: int | str = SEED) -> str:
        return f"{self.seed_dir(seed)}/target/{name}"

    def matched(self, model: str, suffix: str, seed: int | str = SEED) -> str:
        """A matched target search of one seed: P-SACPO at `model`'s harmlessness."""
        return f"{self.seed_dir(seed)}/matched/{model}{suffix}"

    def comparison(self, name: str) -> str:
        """An output of the method comparison (across seeds)."""
        return f"{self.root}/comparison/{name}"

    def table(self, name: str) -> str:
        """An across-seed table."""
        return f"{self.root}/tables/{name}"

    def figure(self, name: str) -> str:
        """An across-seed figure."""
        return f"{self.root}/figures/{name}"
