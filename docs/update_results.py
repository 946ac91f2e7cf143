"""Copy the demo's results into the README (between markers) and docs/figure2.png.

Run after the demo on three seeds (`snakemake --cores all --configfile
config/demo-seeds.yaml`):

    python docs/update_readme.py [--experiment demo-seeds]

It never edits numbers by hand: the tables are the workflow's own Markdown files.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"


def across_seed_rows(markdown: str) -> str:
    """The header and the across-seed rows (`seed` = all) of an across_seeds table:
    every seed's own rows stay in the file, the README shows the summary."""
    lines = markdown.strip().splitlines()
    seed_col = [c.strip() for c in lines[0].strip("|").split("|")].index("seed")
    keep = [line for line in lines[2:]
            if line.strip("|").split("|")[seed_col].strip() == "all"]
    return "\n".join([*lines[:2], *keep])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", default="demo-seeds",
                        help="the experiment whose across-seed results go in (results/<it>/)")
    parser.add_argument("--workdir", type=Path, default=ROOT,
                        help="the folder the demo ran in (e.g. a bench/demo_seeds.py copy)")
    args = parser.parse_args()
    results = f"results/{args.experiment}"
    tables = args.workdir / results / "tables"
    figure = args.workdir / results / "figures" / "figure2.png"
    missing = [p for p in (tables / "winrate.md", tables / "elo.md", figure) if not p.is_file()]
    if missing:
        sys.exit(f"run the demo first; missing: {', '.join(map(str, missing))}")
    shutil.copyfile(figure, ROOT / "docs" / "figure2.png")
    block = "\n".join([
        START,
        "",
        "![Figure 2 of the demo](docs/figure2.png)",
        "",
        f"Win rates against the SFT model, mean over seeds with the t interval over seeds "
        f"(`{results}/tables/winrate.md` also has every seed's rows):",
        "",
        across_seed_rows((tables / "winrate.md").read_text(encoding="utf-8")),
        "",
        f"Elo, mean over seeds (`{results}/tables/elo.md`):",
        "",
        across_seed_rows((tables / "elo.md").read_text(encoding="utf-8")),
        "",
        END,
    ])
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if START not in text:
        sys.exit(f"README.md has no {START} marker")
    text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text,
                  flags=re.S)
    readme.write_text(text, encoding="utf-8")
    print("README.md and docs/figure2.png updated")


if __name__ == "__main__":
    main()
