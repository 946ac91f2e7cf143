"""One line that says whether an install reproduces the demo: a hash of its tables.

`python -m sacpo_steps fingerprint results/demo` hashes every seed's win-rate, Elo
and battle tables and prints the hash with the machine (CPU model, the instruction
sets that choose kernels) and the kernel settings the models were trained under (from
the SFT model's record). With pinned kernels (the default), the same commit, config
and seed give the same fingerprint on other x86-64 machines; docs/reproducibility.md
lists the fingerprints seen so far, with their machines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.lineage import library_versions, model_record
from sacpo_steps.core.reproducibility import cpu_flags, cpu_model

TABLES = ("winrate.csv", "elo.csv", "battles.csv")


def table_files(root: str | Path) -> list[Path]:
    """Every seed's tables under an experiment's results folder, sorted."""
    root = Path(root)
    files = sorted(p for name in TABLES for p in root.glob(f"seed-*/tables/{name}"))
    if not files:
        raise InputError(f"no tables ({', '.join(TABLES)}) under seed-*/tables/: run the "
                         "experiment first", path=root)
    return files


def fingerprint(root: str | Path) -> dict[str, Any]:
    """The tables' combined hash, each file's, and what made them."""
    root = Path(root)
    digest = hashlib.sha256()
    files = {}
    for path in table_files(root):
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        digest.update(rel.encode() + b"\0" + data + b"\0")
        files[rel] = hashlib.sha256(data).hexdigest()[:16]
    trained_under = None
    for folder in sorted(root.glob("seed-*/models/*")) + sorted(root.glob("models/*")):
        record = None if folder.name.startswith(".") else model_record(folder)
        if record is not None:
            trained_under = {**record.get("runtime", {}), **record.get("measured", {})}
            break
    return {"fingerprint": digest.hexdigest()[:16], "files": files,
            "trained_under": trained_under, "cpu": cpu_model(), "cpu_flags": cpu_flags(),
            "libraries": library_versions()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sacpo_steps fingerprint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default="results/demo",
                        help="an experiment's results folder (default: results/demo)")
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    args = parser.parse_args(argv)
    found = fingerprint(args.root)
    if args.json:
        print(json.dumps(found, indent=1))
        return
    under = found["trained_under"] or {}
    print(f"tables fingerprint: {found['fingerprint']}  ({len(found['files'])} tables under "
          f"{args.root})")
    for rel, short in found["files"].items():
        print(f"  {short}  {rel}")
    print(f"trained under: cpu_kernels={under.get('cpu_kernels', '?')}, torch kernels "
          f"{under.get('torch_cpu_capability', '?')}")
    print(f"this machine: {found['cpu']}; {' '.join(found['cpu_flags'])}")
    print("libraries: " + ", ".join(f"{k} {v}" for k, v in found["libraries"].items()))
