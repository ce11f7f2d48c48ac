"""The README's and the docs' figures equal what their results files say (infra/figures.py).

A table or sentence between ``<!-- figures:NAME -->`` markers is rendered from the JSONs
under ``benchmarks/results/`` that its block names; when a new run changes a file, or a
page is edited by hand, the page drifts from its JSON and the first test fails until
``make figures`` renders it again.
"""

from __future__ import annotations

import json

import pytest

from infra import figures
from infra.figures import BLOCKS, RESULTS, WRITERS, Data, FigureError


def test_every_block_on_the_pages_equals_what_its_json_gives():
    stale = [f"{page.name}: figures:{name}" for page, name, _, _ in figures.stale()]
    assert not stale, f"{stale} differ from their JSON: run `make figures`"


def test_every_block_is_on_a_page_and_every_page_block_is_known():
    used = figures.used()
    assert set(BLOCKS) == set(used), (
        sorted(set(BLOCKS) - set(used)),
        sorted(set(used) - set(BLOCKS)),
    )


def test_every_results_file_the_renderer_reads_exists_and_has_a_writer():
    sources = {s for b in BLOCKS.values() for s in b.sources}
    assert sources <= set(WRITERS), sorted(sources - set(WRITERS))
    missing = [s for s in sorted(set(WRITERS)) if not (RESULTS / s).is_file()]
    assert not missing, f"benchmarks/results/ lacks {missing}"


def test_a_missing_key_is_an_error_that_names_the_file_and_the_key():
    d = Data({"ab": {"arms": {"online": {"swt": 91.5}}}}, "training.json")
    assert d["ab", "arms", "online", "swt"] == 91.5
    with pytest.raises(FigureError) as e:
        d["ab", "arms", "popularity", "swt"]
    assert "training.json" in str(e.value) and "'popularity'" in str(e.value)
    assert "make bench-training" in str(e.value)
    with pytest.raises(FigureError, match="is null"):
        Data({"p": None}, "x.json")["p"]


def test_a_block_whose_json_lacks_a_key_fails_naming_it(tmp_path, monkeypatch):
    data = json.loads((RESULTS / "training.json").read_text())
    del data["warm_vs_bare"]
    (tmp_path / "training.json").write_text(json.dumps(data))
    monkeypatch.setattr(figures, "RESULTS", tmp_path)
    with pytest.raises(FigureError) as e:
        figures.render_block("training")
    assert "figures:training" in str(e.value)
    assert "training.json" in str(e.value) and "'warm_vs_bare'" in str(e.value)


def test_a_missing_results_file_is_named_with_its_command(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "RESULTS", tmp_path)
    with pytest.raises(FigureError, match=r"ipa_offline\.json is missing.*make bench-ipa-offline"):
        figures.render_block("ipa-offline-epochs")


def test_a_claim_the_numbers_no_longer_support_fails(tmp_path, monkeypatch):
    """Prose beside the numbers is checked too: here the frozen arm would beat popularity
    in the first tenth, so 'popularity starts far ahead' no longer holds."""
    data = json.loads((RESULTS / "training.json").read_text())
    data["oracle_by_tenth"]["tenths"]["control"][0]["swt"] = 1000.0
    (tmp_path / "training.json").write_text(json.dumps(data))
    monkeypatch.setattr(figures, "RESULTS", tmp_path)
    with pytest.raises(FigureError, match="popularity starts far ahead"):
        figures.render_block("training")


def test_a_page_is_rendered_between_its_markers_only(monkeypatch):
    monkeypatch.setitem(
        BLOCKS, "demo-x", figures.Block("demo-x", (), lambda: "| a |\n| --- |\n| 1 |")
    )
    page = (
        "# T\n\nbefore\n\n  <!-- figures:demo-x -->\n  stale\n  <!-- /figures:demo-x -->\n\nafter\n"
    )
    out, names = figures.render_page(page)
    assert names == ["demo-x"]
    assert out == (
        "# T\n\nbefore\n\n  <!-- figures:demo-x -->\n\n  | a |\n  | --- |\n  | 1 |\n\n"
        "  <!-- /figures:demo-x -->\n\nafter\n"
    )
    assert figures.render_page(out)[0] == out
    with pytest.raises(FigureError, match="no block named 'nope'"):
        figures.render_page("<!-- figures:nope -->\n<!-- /figures:nope -->\n")
    with pytest.raises(FigureError, match="not closed"):
        figures.render_page("<!-- figures:demo-x -->\ntext\n")


def test_numbers_print_as_the_docs_write_them():
    assert figures.count(20403.3) == "20 403" and figures.count(3793) == "3793"
    assert figures.spct(0.184) == "+18.4%" and figures.spct(-0.043) == "\u22124.3%"
    assert figures.ratio(0.4187) == "0.42×" and figures.num(1478.5, 0) == "1479"
    assert figures.pval(0.00037) == "p = 0.0004" and figures.pval(0.0089) == "p = 0.009"
    assert figures.pval(5.1e-6) == "p = 5e\u22126" and figures.pval(0.259) == "p = 0.26"
    assert figures.pspan([0.055, 0.067]) == "5.5–6.7%" and figures.span([2.0, 2.0], str) == "2.0"
