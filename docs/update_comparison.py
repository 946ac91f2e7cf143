"""Copy the method comparison's results into docs/comparison.md (between markers), and
its frontier figure into docs/comparison-frontier.png.

Run after the comparison (`snakemake --cores all --configfile config/comparison.yaml`):

    python docs/update_comparison.py [--experiment comparison] [--workdir DIR]

The tables are the workflow's own Markdown files (the comparison job's, and the
across-seed rows of the win-rate table); nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_results import across_seed_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "comparison.md"
FIGURE = ROOT / "docs" / "comparison-frontier.png"
START, END = "<!-- comparison-results:start -->", "<!-- comparison-results:end -->"


def demote(markdown: str) -> str:
    """The step's Markdown under the page's own headings: `# X` becomes `### X`."""
    return re.sub(r"^# ", "### ", markdown.strip(), flags=re.M)


def block(results: str, winrate_md: str, costs_md: str, matched_md: str,
          dominance_md: str) -> str:
    return "\n".join([
        START, "",
        "![Each method's frontier on the demo, seeds 0-2](comparison-frontier.png)", "",
        f"Win rates against the SFT model, mean over seeds with the t interval over seeds "
        f"(`{results}/tables/winrate.md` also has every seed's rows):", "",
        across_seed_rows(winrate_md), "",
        demote(matched_md), "",
        demote(dominance_md), "",
        demote(costs_md), "",
        END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="comparison")
    parser.add_argument("--workdir", type=Path, default=ROOT,
                        help="the folder the workflow ran in (holds results/)")
    args = parser.parse_args()
    results = f"results/{args.experiment}"
    base = args.workdir / results
    out = base / "comparison"
    needed = [base / "tables" / "winrate.md",
              *(out / f"{n}.md" for n in ("costs", "matched", "dominance")),
              out / "frontier.png"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        sys.exit(f"missing (run the comparison first): {', '.join(missing)}")
    new = block(results, *(p.read_text(encoding="utf-8") for p in needed[:4]))
    text = PAGE.read_text(encoding="utf-8")
    if text.count(START) != 1 or text.count(END) != 1:
        sys.exit(f"{PAGE} must hold {START} and {END} once each")
    PAGE.write_text(re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: new, text,
                           flags=re.S), encoding="utf-8")
    shutil.copy2(out / "frontier.png", FIGURE)
    print(f"updated {PAGE.relative_to(ROOT)} and {FIGURE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
