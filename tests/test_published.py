"""The committed notebooks are the published study: the reference run's executed notebooks (full profile, real
data, no errors, outputs kept, each under 2 MB), each read as a story (title and question, a line of Markdown
before every figure, short code cells, a closing "what we found"), and what they show matches results/*.json.

Refreshing them is part of publishing the reference run (``make reference``: ``vericar.study --publish``).
"""

from __future__ import annotations

import json

import nbformat
import pytest

from conftest import PROJECT_ROOT
from vericar import study
from vericar.findings import findings
from vericar.report import FINDINGS_END, FINDINGS_START, findings_block

NOTEBOOKS = study.notebooks()
MAX_BYTES = 2_000_000
MAX_CODE_LINES = 15


def _read(path):
    return nbformat.read(path, as_version=4)


def _tags(cell) -> list[str]:
    return cell.metadata.get("tags", [])


def _shows_figure(cell) -> bool:
    return any("image/png" in o.get("data", {}) or "image/jpeg" in o.get("data", {}) for o in cell.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_reads_as_a_story(path):
    nb = _read(path)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {path.name[:2]} · "), path.name
    assert "**Question.**" in first.source, f"{path.name}: the first cell states the question it answers"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or {"parameters", "injected-parameters"} & set(_tags(cell)):
            continue
        lines = len(cell.source.splitlines())
        assert lines <= MAX_CODE_LINES, f"{path.name} cell {i}: {lines} lines of code (logic goes to the library)"
        if _shows_figure(cell) or "plt.show()" in cell.source:
            assert nb.cells[i - 1].cell_type == "markdown", f"{path.name} cell {i}: say what to look at first"
    assert nb.cells[-2].cell_type == "markdown" and nb.cells[-2].source.startswith("## What we found")
    assert "findings" in _tags(nb.cells[-1]) and "findings(" in nb.cells[-1].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_published_notebook_is_the_full_profile_on_real_data(path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size:,} bytes"
    nb = _read(path)
    meta = nb.metadata.get("papermill", {})
    assert meta, f"{path.name} was not executed by papermill: publish the reference run (make reference)"
    assert not meta.get("exception"), f"{path.name} raised when it was executed"
    ran, expected = meta["parameters"], study.parameters_for(path, "full", {})
    for key, value in expected.items():
        if key not in study.PATH_PARAMETERS:
            assert ran.get(key) == value, f"{path.name}: {key} = {ran.get(key)!r}, the full profile says {value!r}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code if c.source.strip()), f"{path.name}: a cell never ran"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0].get('ename')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_published_notebook_shows_what_results_json_says(path):
    results = PROJECT_ROOT / "results" / f"{path.stem}.json"
    payload = json.loads(results.read_text())
    assert payload.get("dataset", payload.get("entries", [{}])[0].get("dataset")) == "stanford_cars"
    cell = _read(path).cells[-1]
    shown = "".join(o.get("data", {}).get("text/markdown", "") for o in cell.get("outputs", []))
    assert shown == findings(path.name[:2], payload), f"{path.name} shows other numbers than {results.name}"


def test_readme_opens_with_the_findings():
    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split(FINDINGS_START, 1)[1].split(FINDINGS_END, 1)[0].strip()
    assert block == findings_block(PROJECT_ROOT / "results"), "README findings are stale: python -m vericar.report --readme README.md"
    assert text.index(FINDINGS_START) < text.index("## Two commands")
