"""Render the results table of the README from ``results/*.json`` (never typed by hand).

    python -m vericar.report                   # print the table
    python -m vericar.report --readme README.md   # replace the block between the results markers
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"

#: The metrics shown per notebook (others stay in the JSON). Percent-formatted when in [0, 1].
HEADLINE = {
    "01_eda": ["images", "classes", "makes", "near_duplicate_pairs", "near_duplicates_cross_class"],
    "03_training": ["precision_at_1", "map_at_r", "accuracy_make", "accuracy_model", "train_seconds"],
    "06_ood": ["fpr95", "auroc", "aupr"],
}
COUNT_METRICS = {"images", "classes", "makes", "near_duplicate_pairs", "near_duplicates_cross_class",
                 "train_seconds", "images_per_second"}


def _fmt(name: str, value) -> str:
    if value is None:
        return "n/a"
    if name in COUNT_METRICS or not isinstance(value, float) or not 0 <= value <= 1:
        return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)
    return f"{100 * value:.1f}%"


def _label(entry: dict) -> str:
    extra = [entry.get(k) for k in ("mode", "method", "variant", "holdout", "loss") if entry.get(k)]
    return "; ".join(str(e) for e in extra)


def results_table(results_dir: str | Path) -> str:
    """A markdown table: one row per results entry, its labels and headline metrics."""
    rows = ["| notebook | dataset | protocol | backbone @ input | device | setting | headline metrics |",
            "|---|---|---|---|---|---|---|"]
    for path in sorted(Path(results_dir).glob("*.json")):
        payload = json.loads(path.read_text())
        entries = payload.get("entries") or [payload]
        for entry in entries:
            metrics = entry.get("metrics", {})
            names = [m for m in HEADLINE.get(path.stem, list(metrics)[:4]) if m in metrics]
            shown = ", ".join(f"{m} {_fmt(m, metrics[m])}" for m in names)
            backbone = f"{entry.get('backbone')} @ {entry.get('image_size')}px" if entry.get("backbone") else "-"
            dataset = entry.get("dataset_name") or entry.get("dataset") or payload.get("dataset")
            rows.append(f"| {path.stem} | {dataset} | {entry.get('protocol') or '-'} | {backbone} | "
                        f"{entry.get('device') or '-'} | {_label(entry) or '-'} | {shown} |")
    commands = sorted({json.loads(p.read_text()).get("command", "") for p in Path(results_dir).glob("*.json")})
    rows.append("")
    rows.append("Made by: " + "; ".join(f"`{c}`" for c in commands if c) if commands else "")
    return "\n".join(rows)


def update_readme(readme: str | Path, results_dir: str | Path) -> None:
    readme = Path(readme)
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{results_table(results_dir)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vericar.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results")
    parser.add_argument("--readme")
    args = parser.parse_args(argv)
    if args.readme:
        update_readme(args.readme, args.results)
    else:
        print(results_table(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
