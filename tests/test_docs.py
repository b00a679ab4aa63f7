"""Every measured table and plot in README.md and docs/ is what scripts/render_docs.py makes
from its result file: a figure typed by hand, a result file re-run without re-rendering, or a
plot missing or drawn from other bytes, fails."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_table_is_rendered_from_its_file(render_docs):
    blocks = 0
    for doc in render_docs.documents():
        text = doc.read_text()
        blocks += len(render_docs.BLOCK.findall(text))
        assert render_docs.render(text, render_docs.base_of(doc)) == text, \
            f"{doc.name}: run python scripts/render_docs.py"
        assert not render_docs.stale_figures(text), f"{doc.name}: run python scripts/render_docs.py"
    assert blocks, "no rendered table: nothing was checked"


def test_a_table_edited_by_hand_is_caught(render_docs):
    text = (ROOT / "README.md").read_text()
    m = render_docs.BLOCK.search(text)
    edited = text[:m.start(4)] + m.group(4).replace("|", "| 0", 1) + text[m.end(4):]
    assert render_docs.render(edited) != edited


def test_a_result_file_without_provenance_is_stale(render_docs, tmp_path, monkeypatch):
    monkeypatch.setattr(render_docs, "RESULTS", tmp_path)
    (tmp_path / "old.json").write_text(json.dumps({"runs": [], "versions": {}}))
    with pytest.raises(render_docs.StaleResult, match="lacks command, commit, date"):
        render_docs.render("<!-- render: false-alarms old.json -->\n<!-- /render -->")


def test_a_plot_missing_or_drawn_from_other_bytes_is_caught(render_docs, tmp_path, monkeypatch):
    monkeypatch.setattr(render_docs, "RESULTS", tmp_path)
    result = json.loads((ROOT / "benchmarks" / "results" / "parity_small_cpu.json").read_text())
    (tmp_path / "p.json").write_text(json.dumps(result))
    text = "<!-- render: parity p.json -->\n<!-- /render -->"
    assert render_docs.stale_figures(text)[0][2].endswith("p.png is missing")
    render_docs.draw("parity", "p.json")
    assert render_docs.stale_figures(text) == []
    result["rows"][0]["max_abs"] = 1.0  # the file re-run, the plot not redrawn
    (tmp_path / "p.json").write_text(json.dumps(result))
    assert "was not drawn from p.json" in render_docs.stale_figures(text)[0][2]


def anchors(page):
    """The anchors GitHub makes of a page's headings: lower case, punctuation but - and _
    dropped, spaces as -."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in page.read_text().splitlines() if line.startswith("#")}


def test_every_link_of_the_pages_leads_to_a_file_and_heading():
    link = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in link.findall(doc.read_text()):
            if "://" in target:
                continue
            page = doc.parent / target if target else doc
            assert page.exists(), f"{doc.name} links to {target}, which is missing"
            if anchor and page.suffix == ".md":
                assert anchor in anchors(page), f"{doc.name} links to {target}#{anchor}: no such heading"


def test_a_link_to_a_missing_heading_is_caught():
    assert "the-verdict-as-an-instrument-false-alarms-and-planted-bugs" in anchors(ROOT / "docs" / "parity.md")
    assert "what-the-parity-work-finds" not in anchors(ROOT / "docs" / "parity.md")


def test_a_result_file_of_an_older_schema_is_stale(render_docs, tmp_path, monkeypatch):
    monkeypatch.setattr(render_docs, "RESULTS", tmp_path)
    result = json.loads((ROOT / "benchmarks" / "results" / "bench_small_cpu.json").read_text())
    del result["results"][0]["mfu_causal"]  # a field the bench table reads, from before it was written
    (tmp_path / "old.json").write_text(json.dumps(result))
    with pytest.raises(render_docs.StaleResult, match="old.json lacks 'mfu_causal', which the bench table reads"):
        render_docs.render("<!-- render: bench old.json -->\n<!-- /render -->")


def test_every_result_file_records_its_command_stack_machine_and_commit(render_docs):
    files = sorted(render_docs.RESULTS.rglob("*.json"))
    assert files
    for path in files:
        render_docs.load(str(path.relative_to(render_docs.RESULTS)))  # StaleResult if not
