"""Copy the demo's results into the README and docs/results.md (between markers), and
its Figure 2 into docs/figure2.png.

Run after the demo on three seeds (`snakemake --cores all --configfile
config/demo-seeds.yaml`):

    python docs/update_results.py [--experiment demo-seeds] [--workdir DIR]

It never edits numbers by hand: the tables are the workflow's own Markdown files. The
README gets the figure and the across-seed win rates (its headline table);
docs/results.md the figure, the win rates and the Elo ratings.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
#: each page the results go to, and the figure's path as that page links it
PAGES = {"README.md": "docs/figure2.png", "docs/results.md": "figure2.png"}


def across_seed_rows(markdown: str) -> str:
    """The header and the across-seed rows (`seed` = all) of an across_seeds table:
    every seed's own rows stay in the file, the pages show the summary."""
    lines = markdown.strip().splitlines()
    seed_col = [c.strip() for c in lines[0].strip("|").split("|")].index("seed")
    keep = [line for line in lines[2:]
            if line.strip("|").split("|")[seed_col].strip() == "all"]
    return "\n".join([*lines[:2], *keep])


def block(page: str, results: str, winrate_md: str, elo_md: str) -> str:
    """What goes between the markers of `page` (a key of PAGES)."""
    parts = [
        START, "",
        f"![Figure 2 of the demo]({PAGES[page]})", "",
        f"Win rates against the SFT model, mean over seeds with the t interval over seeds "
        f"(`{results}/tables/winrate.md` also has every seed's rows):", "",
        across_seed_rows(winrate_md), "",
    ]
    if page != "README.md":
        parts += [f"Elo, mean over seeds (`{results}/tables/elo.md`):", "",
                  across_seed_rows(elo_md), ""]
    return "\n".join([*parts, END])


def replace_block(text: str, new: str, where: str) -> str:
    """`text` with its one block between the markers replaced by `new`."""
    if text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(f"{where} must hold {START} and {END} once each")
    return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: new, text,
                  flags=re.S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    winrate = (tables / "winrate.md").read_text(encoding="utf-8")
    elo = (tables / "elo.md").read_text(encoding="utf-8")
    pages = {page: (ROOT / page).read_text(encoding="utf-8") for page in PAGES}
    try:  # check every page before writing any
        new = {page: replace_block(text, block(page, results, winrate, elo), page)
               for page, text in pages.items()}
    except ValueError as exc:
        sys.exit(str(exc))
    shutil.copyfile(figure, ROOT / "docs" / "figure2.png")
    for page, text in new.items():
        (ROOT / page).write_text(text, encoding="utf-8")
    print(f"{', '.join(PAGES)} and docs/figure2.png updated")


if __name__ == "__main__":
    main()
