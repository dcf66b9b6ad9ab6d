"""Render the README's findings, results and benchmark tables from the JSON that runs wrote (never typed by
hand), and the executed study as HTML for readers without Jupyter.

    python -m vericar.report                   # print the tables
    python -m vericar.report --readme README.md   # replace the blocks between the findings / results / ... markers
    python -m vericar.report --html runs/report   # the committed executed notebooks as HTML, with a contents page

Results come from ``results/*.json`` (the notebooks), benchmarks from ``benchmarks/results/bench_*.json``
(the scripts in ``benchmarks/``; ``*_quick.json`` smoke runs are left out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
BENCH_START, BENCH_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
FINDINGS_START, FINDINGS_END = "<!-- findings:start -->", "<!-- findings:end -->"

#: The metrics shown per notebook (others stay in the JSON). Rates (see :func:`is_rate`) are shown in percent.
HEADLINE = {
    "01_eda": ["images", "classes", "makes", "near_duplicate_pairs", "near_duplicates_cross_class"],
    "03_training": ["precision_at_1", "map_at_r", "accuracy_make", "accuracy_model", "train_seconds"],
    "04_embeddings_umap": ["purity_query_frozen_model", "purity_query_trained_model", "purity_query_trained_make",
                           "open_world_trained_heldout_class_purity"],
    "05_error_analysis": ["precision_at_1", "frozen_precision_at_1", "accuracy_make", "n_errors"],
    "reference_cost": ["total_hours", "training_seconds", "notebooks_seconds", "models"],
    "06_ood": ["fpr95", "auroc", "aupr", "oscr", "closed_set_accuracy", "new_precision_at_1",
               "known_precision_at_1_before", "known_precision_at_1_after", "new_accepted"],
}
COUNT_METRICS = {"images", "classes", "makes", "near_duplicate_pairs", "near_duplicates_cross_class",
                 "train_seconds", "images_per_second", "n_errors", "n_queries", "notebooks_seconds",
                 "training_seconds"}


#: Words that make a metric a rate (a share of queries, images or pairs), shown in percent. Everything else
#: (losses, norms, scores, cosines) is shown as a plain number, whatever its value.
RATE_WORDS = ("precision", "recall", "accuracy", "map", "fpr95", "auroc", "aupr", "oscr", "purity", "accepted",
              "share", "rate")


#: Words that make a metric something else computed from rates (a correlation, a difference): not a rate.
NOT_RATE_WORDS = ("spearman", "pearson", "corr", "correlation", "cosine", "slope", "diff", "delta", "gap", "gain",
                  "change", "ratio")


def is_rate(name: str) -> bool:
    """True when the metric ``name`` is a rate: one of :data:`RATE_WORDS` is a word of it, none of
    :data:`NOT_RATE_WORDS` is."""
    words = name.lower().split("_")
    return any(w in RATE_WORDS for w in words) and not any(w in NOT_RATE_WORDS for w in words)


def _fmt(name: str, value) -> str:
    if value is None:
        return "n/a"
    if name in COUNT_METRICS or isinstance(value, int):
        return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)
    if not isinstance(value, float):
        return str(value)
    return f"{100 * value:.1f}%" if is_rate(name) else f"{value:.3g}"


def _label(entry: dict) -> str:
    extra = [entry.get(k) for k in ("mode", "method", "variant", "holdout", "loss") if entry.get(k)]
    if entry.get("unknown"):  # 06's open-set entries: which unknown classes (the SSB's groups or held-out models)
        extra.append(f"{'SSB ' if entry.get('protocol') == 'ssb' else ''}{entry['unknown']} unknowns")
    if entry.get("chosen_on_validation"):
        extra.append("chosen on validation")
    if entry.get("shots") is not None:  # 06's add-without-retraining entries
        extra.append(f"new classes added with {entry['shots']} labelled images each")
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


def _machine(payload: dict) -> str:
    m = payload.get("machine", {})
    load = m.get("load_average_1_5_15min_at_start")
    load_text = f", load {load[0]:.1f} at start" if load else ""
    threads = f", {m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}" if m.get("torch_threads") else ""
    return f"{m.get('cpu_count', '?')} CPU cores{threads}, torch {m.get('torch', '?')}{load_text}"


def benchmarks_table(bench_dir: str | Path) -> str:
    """Markdown tables of the benchmark JSON files: queries/s and the speed ratio each script reports."""
    out: list[str] = []
    for path in sorted(Path(bench_dir).glob("bench_*.json")):
        if path.stem.endswith("_quick"):
            continue
        payload = json.loads(path.read_text())
        name = payload.get("benchmark", path.stem)
        if "rows" in payload:  # bench_inference: embedding throughput per backend
            out += _inference_table(name, payload)
            continue
        if payload.get("kind") == "train":
            out += [_train_benchmark_table(payload), ""]
            continue
        if "n_queries" not in payload:  # a benchmark without a retrieval table: render its rows as they are
            out += [_generic_table(payload), ""]
            continue
        data = f", {payload['data']} data" if payload.get("data") else ""
        out.append(f"`python benchmarks/{name}.py` ({payload.get('n_queries')} queries, {payload.get('dim')}-d"
                   f"{data}; {_machine(payload)}; {payload.get('timestamp', '')[:10]}):")
        out.append("")
        ratio = next((k for k in (payload.get("results") or [{}])[0] if k.startswith("speed")), None)
        recall = any("recall_at_1" in r for r in payload.get("results", []))
        out.append("| database | method | k | queries/s | " + (ratio or "ratio").replace("_", " ")
                   + (" | recall@1 vs exact |" if recall else " |"))
        out.append("|---|---|---|---|---|" + ("---|" if recall else ""))
        for r in payload.get("results", []):
            row = (f"| {r['db_size']:,} | {r['method']} | {r.get('k', payload.get('k'))} | "
                   f"{r['queries_per_s']:,.0f} | {r.get(ratio, float('nan')):.2f}x |")
            out.append(row + (f" {r.get('recall_at_1', float('nan')):.3f} |" if recall else ""))
        out.append("")
    return "\n".join(out).rstrip()


def _train_benchmark_table(payload: dict) -> str:
    """bench_train.json: img/s, speed against the fp32 full fine-tune, peak memory, per mode and precision."""
    lines = [f"`python benchmarks/bench_train.py` (training steps after warm-up, batch 128 cached / 64 fine-tune, "
             f"random inputs of the real shapes; {_machine(payload)}; {payload.get('timestamp', '')[:10]}):", "",
             "| backbone | mode | input | precision | img/s | vs full fine-tune fp32 | step peak RSS GiB | "
             "+ dataset cache GiB |", "|---|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        ratio = f"{r['speed_vs_full_fp32']:.2f}x" if r.get("speed_vs_full_fp32") else "-"
        cache = f"{r['cache_gib']:.2f}" if r.get("cache_gib") is not None else "-"
        mode = {"infer": "inference (no grad)", "full": "full fine-tune", "head": "head only"}.get(
            r["mode"], r["mode"] + " stage(s), cached trunk")
        lines.append(f"| {r['backbone']} | {mode} | {r['image_size']} px | {r['precision']} | "
                     f"{r['images_per_s']:,.0f} | {ratio} | {r['peak_rss_gib']:.2f} | {cache} |")
    return "\n".join(lines)


def _generic_table(payload: dict) -> str:
    """Any other benchmark JSON with a ``results`` list of flat rows: a plain markdown table of them."""
    import pandas as pd

    rows = pd.DataFrame(payload.get("results", []))
    head = f"`python benchmarks/{payload.get('benchmark')}.py` ({_machine(payload)}; {payload.get('timestamp', '')[:10]}):"
    return head + "\n\n" + (rows.to_markdown(index=False, floatfmt=".4g") if not rows.empty else "(no rows)")


def _inference_table(name: str, payload: dict) -> list[str]:
    rows = payload["rows"]
    out = [f"`python benchmarks/{name}.py` ({payload.get('images')} images, {rows[0]['backbone']}; "
           f"{_machine(payload)}; {payload.get('timestamp', '')[:10]}):", "",
           "| input | flip TTA | backend | images/s | speed vs torch fp32 | max 1 - cos vs torch fp32 |",
           "|---|---|---|---|---|---|"]
    out += [f"| {r['image_size']} px | {'yes' if r['flip_tta'] else 'no'} | {r['backend']} | "
            f"{r['images_per_second']:,.0f} | {r['speedup_vs_torch_fp32']:.2f}x | "
            f"{r['max_cosine_gap_vs_torch_fp32']:.1e} |" for r in rows]
    return out + [""]


def _replace_block(text: str, start: str, end: str, body: str, readme: Path) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


SEARCH_START, SEARCH_END = "<!-- search:start -->", "<!-- search:end -->"


def search_table(results_dir: str | Path) -> str:
    """The recipe search (``results/recipe_search.md``, written by ``scripts/recipe_search.py``), as it is, then
    the chosen recipes' test numbers (``results/recipe_search_test.md``) when there are any."""
    path, test = Path(results_dir) / "recipe_search.md", Path(results_dir) / "recipe_search_test.md"
    if not path.is_file():
        return "(no recipe search yet: python scripts/recipe_search.py)"
    return path.read_text().strip() + ("\n\n" + test.read_text().strip() if test.is_file() else "")


def findings_block(results_dir: str | Path, notebooks_dir: str | Path = "notebooks") -> str:
    """The README's opening: per notebook, its headline (:func:`vericar.findings.headline`, from its results
    JSON), a link to the executed notebook, and its key figure inline."""
    from .findings import KEY_FIGURES, headline

    out = []
    for path in sorted(Path(results_dir).glob("[0-9][0-9]_*.json")):
        number, result = path.name[:2], json.loads(path.read_text())
        notebook = Path(notebooks_dir) / f"{path.stem}.ipynb"
        title = path.stem[3:].replace("_", " ")
        out += [f"**[{number} · {title}]({notebook.as_posix()})**: {headline(number, result).strip('* ')}", ""]
        if number in KEY_FIGURES:
            out += [f'<img src="figures/{KEY_FIGURES[number]}" width="560" alt="{KEY_FIGURES[number]}">', ""]
    return "\n".join(out).strip()


def update_readme(readme: str | Path, results_dir: str | Path, bench_dir: str | Path | None = None) -> None:
    """Rewrite the findings block (when the README has one), the results block, the recipe-search block (when
    the README has one) and the benchmarks block (when ``bench_dir`` is given)."""
    readme = Path(readme)
    text = _replace_block(readme.read_text(), START, END, results_table(results_dir), readme)
    if FINDINGS_START in text:
        text = _replace_block(text, FINDINGS_START, FINDINGS_END, findings_block(results_dir), readme)
    if SEARCH_START in text:
        text = _replace_block(text, SEARCH_START, SEARCH_END, search_table(results_dir), readme)
    if bench_dir is not None:
        text = _replace_block(text, BENCH_START, BENCH_END, benchmarks_table(bench_dir), readme)
    readme.write_text(text)


def build_html(notebooks_dir: str | Path, out_dir: str | Path) -> Path:
    """The executed notebooks as HTML pages (nbconvert, lab template) and an ``index.html`` table of contents:
    each notebook's title, then its sections, linked to nbconvert's heading anchors. Returns the index."""
    import html
    import re

    import nbformat
    from nbconvert import HTMLExporter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise SystemExit(f"no numbered notebooks in {notebooks_dir}")
    exporter = HTMLExporter(template_name="lab")
    toc = []
    for nb_path in notebooks:
        nb = nbformat.read(nb_path, as_version=4)
        if not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"):
            print(f"[vericar.report] note: {nb_path.name} has no outputs (not executed); run `make reference` "
                  f"or point --notebooks at a run's notebooks/ folder")
        body, _ = exporter.from_notebook_node(nb)
        page = out_dir / f"{nb_path.stem}.html"
        back = '<p style="margin:1em 2em"><a href="index.html">&larr; contents</a></p>'
        page.write_text(body.replace("</body>", back + "</body>", 1), encoding="utf-8")
        # nbconvert gives every Markdown heading an id; the contents page links to them (h1 and h2 only)
        heads = re.findall(r'<h([12]) id="([^"]+)"[^>]*>(.*?)</h\1>', body, flags=re.S)
        items = [(level, anchor, re.sub(r"<[^>]+>|¶", "", text).strip()) for level, anchor, text in heads]
        title = next((t for lvl, _, t in items if lvl == "1"), nb_path.stem)
        sections = "".join(f'<li><a href="{page.name}#{a}">{html.escape(t)}</a></li>'
                           for lvl, a, t in items if lvl == "2")
        toc.append(f'<li><a href="{page.name}"><b>{html.escape(title)}</b></a><ul>{sections}</ul></li>')
    index = out_dir / "index.html"
    index.write_text("<!doctype html><meta charset='utf-8'><title>vericar: the study</title>"
                     "<body style='font-family:sans-serif;max-width:60em;margin:2em auto'>"
                     "<h1>vericar: the executed study</h1><p>Each notebook as it ran in the reference run "
                     "(see the README for the commands).</p><ol>" + "".join(toc) + "</ol></body>", encoding="utf-8")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vericar.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results")
    parser.add_argument("--benchmarks", default="benchmarks/results")
    parser.add_argument("--readme")
    parser.add_argument("--html", metavar="OUT_DIR", help="write the executed notebooks as HTML with a contents page")
    parser.add_argument("--notebooks", default="notebooks", help="the executed notebooks (for --html)")
    args = parser.parse_args(argv)
    if args.html:
        print(f"[vericar.report] {build_html(args.notebooks, args.html)}")
    elif args.readme:
        update_readme(args.readme, args.results, args.benchmarks)
    else:
        print(results_table(args.results))
        print()
        print(benchmarks_table(args.benchmarks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
