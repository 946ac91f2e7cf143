"""The source hashes' import search, kept between Snakemake calls (provenance.use_import_cache):
the same closures and hashes as without it, and an edited file is searched again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from sacpo_steps.core.provenance import PACKAGE_DIR

_PROBE = """
import ast, json, sys
parsed = []
_parse = ast.parse
ast.parse = lambda source, *a, **k: parsed.append(1) or _parse(source, *a, **k)
from sacpo_steps.core import provenance
from sacpo_steps.steps import STEPS, TOOLS
if sys.argv[1] != "-":
    provenance.use_import_cache(sys.argv[1])
print(json.dumps({
    "hashes": {s: provenance.source_hash(m) for s, m in {**STEPS, **TOOLS}.items()},
    "closures": {s: [p.relative_to(provenance.PACKAGE_DIR).as_posix()
                     for p in provenance.module_closure(m)]
                 for s, m in {**STEPS, **TOOLS}.items()},
    "parsed": len(parsed),
}))
"""


def probe(root: Path, cache: Path | None) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(cache) if cache else "-"],
                         cwd=root, check=True, capture_output=True, text=True,
                         env={"PYTHONPATH": str(root), "PYTHONSAFEPATH": "1"})
    return json.loads(out.stdout)


def test_the_import_cache_changes_no_hash_and_misses_an_edited_file(tmp_path):
    root = tmp_path / "code"
    shutil.copytree(PACKAGE_DIR, root / "sacpo_steps",
                    ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / ".snakemake" / "sacpo_steps" / "imports.json"
    plain = probe(root, None)
    first = probe(root, cache)
    assert cache.is_file()
    again = probe(root, cache)
    files = {f for closure in plain["closures"].values() for f in closure}
    # each file parsed once without the cache, and not at all with a warm one
    assert plain["parsed"] == first["parsed"] == len(files)
    assert again["parsed"] == 0
    for run in (first, again):
        assert (run["hashes"], run["closures"]) == (plain["hashes"], plain["closures"])

    # an edited file is searched again: winrate now imports the demo spec
    winrate = root / "sacpo_steps" / "evaluation" / "winrate.py"
    winrate.write_text(winrate.read_text(encoding="utf-8")
                       + "\nif False:\n    import sacpo_steps.data.demo_spec  # noqa\n",
                       encoding="utf-8")
    edited = probe(root, cache)
    assert edited["parsed"] == 1  # winrate.py only: demo_spec.py is in the cache already
    assert "data/demo_spec.py" in edited["closures"]["winrate"]
    assert edited["hashes"]["winrate"] != plain["hashes"]["winrate"]
    assert edited == {**probe(root, None), "parsed": 1}

    # an unreadable cache is no cache
    cache.write_text("{not json", encoding="utf-8")
    assert {**probe(root, cache), "parsed": 0} == {**edited, "parsed": 0}
