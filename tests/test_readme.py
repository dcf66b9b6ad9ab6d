"""The README's commands and example cannot rot: the example runs, the commands are the Makefile's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vericar.report import results_table, update_readme

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_library_example_runs(tmp_path, monkeypatch):
    section = README.split("## Use the library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "readme-example" / "metrics.json").is_file()


def test_readme_set_up_commands_are_the_makefile_and_ci():
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", README, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make study", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^study:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_results_table_reads_the_json(tmp_path):
    import json
    (tmp_path / "03_training.json").write_text(json.dumps({
        "command": "python -m vericar.study --profile full", "entries": [
            {"dataset": "stanford_cars", "protocol": "official", "backbone": "efficientnet_lite0", "image_size": 160,
             "device": "cpu", "mode": "head-only", "metrics": {"precision_at_1": 0.5, "map_at_r": 0.25}}]}))
    table = results_table(tmp_path)
    assert "| 03_training | stanford_cars | official | efficientnet_lite0 @ 160px | cpu | head-only |" in table
    assert "precision_at_1 50.0%" in table and "`python -m vericar.study --profile full`" in table
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- results:start -->\nold\n<!-- results:end -->\nb\n")
    update_readme(readme, tmp_path)
    assert "old" not in readme.read_text() and "precision_at_1 50.0%" in readme.read_text()


def test_metrics_are_formatted_by_kind_not_by_value(tmp_path):
    import json
    (tmp_path / "02_gradient_bug.json").write_text(json.dumps({"entries": [
        {"dataset": "stanford_cars", "protocol": "seed", "metrics": {"precision_at_1": 0.461, "loss_first": 0.765,
                                                                      "auroc": 0.9, "grad_cosine": 0.5}}]}))
    table = results_table(tmp_path)
    assert "precision_at_1 46.1%" in table and "auroc 90.0%" in table
    assert "loss_first 0.765" in table and "grad_cosine 0.5" in table and "76.5%" not in table


def test_readme_table_matches_committed_results():
    """The committed README shows exactly what results/ holds (refresh with python -m vericar.report)."""
    if not list((ROOT / "results").glob("*.json")):
        pytest.skip("no reference results committed yet")
    block = README.split("<!-- results:start -->\n", 1)[1].split("\n<!-- results:end -->", 1)[0]
    assert block == results_table(ROOT / "results")


def test_benchmarks_table_reads_the_json(tmp_path):
    import json
    from vericar.report import benchmarks_table
    (tmp_path / "bench_index.json").write_text(json.dumps({
        "benchmark": "bench_index", "data": "latent", "n_queries": 1000, "dim": 256, "k": 10,
        "machine": {"cpu_count": 2, "torch": "2.14.1", "load_average_1_5_15min_at_start": [0.1, 0.2, 0.3]},
        "timestamp": "2026-11-27T03:30:00", "results": [
            {"db_size": 1000000, "method": "faiss IVF nprobe=16", "queries_per_s": 2743.2,
             "speed_vs_exact_torch": 41.87, "recall_at_1": 0.998}]}))
    (tmp_path / "bench_index_quick.json").write_text("{not read}")
    table = benchmarks_table(tmp_path)
    assert "`python benchmarks/bench_index.py` (1000 queries, 256-d, latent data; 2 CPU cores" in table
    assert "| 1,000,000 | faiss IVF nprobe=16 | 10 | 2,743 | 41.87x | 0.998 |" in table


def test_readme_benchmarks_match_committed_json():
    from vericar.report import benchmarks_table
    block = README.split("<!-- benchmarks:start -->\n", 1)[1].split("\n<!-- benchmarks:end -->", 1)[0]
    assert block == benchmarks_table(ROOT / "benchmarks" / "results")


def test_benchmarks_table_shows_inference_backends(tmp_path):
    import json
    from vericar.report import benchmarks_table
    (tmp_path / "bench_inference.json").write_text(json.dumps({
        "benchmark": "bench_inference", "images": 128, "machine": {"cpu_count": 2, "torch": "2.14.1"},
        "timestamp": "2026-12-02T16:00:00", "rows": [
            {"backbone": "efficientnet_lite0", "image_size": 128, "flip_tta": False, "backend": "onnx",
             "images_per_second": 512.4, "speedup_vs_torch_fp32": 1.86, "max_cosine_gap_vs_torch_fp32": 6e-8}]}))
    table = benchmarks_table(tmp_path)
    assert "`python benchmarks/bench_inference.py` (128 images, efficientnet_lite0; 2 CPU cores" in table
    assert "| 128 px | no | onnx | 512 | 1.86x | 6.0e-08 |" in table


def test_html_report_has_a_page_per_notebook_and_a_contents_page(tmp_path):
    import nbformat

    from vericar.report import build_html

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 01 · The data\n\n## How many cars"),
                                         nbformat.v4.new_code_cell("1 + 1")])
    nb.cells[1].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)]
    nbformat.write(nb, tmp_path / "01_eda.ipynb")
    index = build_html(tmp_path, tmp_path / "html")
    page = (tmp_path / "html" / "01_eda.html").read_text()
    contents = index.read_text()
    assert "01 · The data" in contents and 'href="01_eda.html#How-many-cars"' in contents
    assert 'id="How-many-cars"' in page and 'href="index.html"' in page


def test_findings_block_links_each_notebook_with_its_headline(tmp_path, monkeypatch):
    from vericar import findings
    from vericar.report import findings_block

    monkeypatch.setattr(findings, "nb01", lambda r: f"**We saw {r['images']} images.**\n\n- more", raising=False)
    (tmp_path / "01_eda.json").write_text('{"images": 16185}')
    block = findings_block(tmp_path)
    assert block.startswith("**[01 · eda](notebooks/01_eda.ipynb)**: We saw 16185 images.")
    assert 'src="figures/01_sample_grid.png"' in block


def test_search_block_adds_the_chosen_recipes_test_table_when_there_is_one(tmp_path):
    from vericar.report import search_table

    assert search_table(tmp_path).startswith("(no recipe search yet")
    (tmp_path / "recipe_search.md").write_text("val table\n")
    assert search_table(tmp_path) == "val table"
    (tmp_path / "recipe_search_test.md").write_text("test table\n")
    assert search_table(tmp_path) == "val table\n\ntest table"
