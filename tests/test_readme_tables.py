"""The README's benchmark tables are what bench/readme_tables.py writes from the committed runs."""

from __future__ import annotations

import json

import pytest

from bench_helpers import REPO as ROOT, bench_script


def _script():
    return bench_script("readme_tables")


def test_every_marked_document_matches_the_committed_results():
    tables = _script()
    for path in tables.DOCUMENTS:
        text = path.read_text()
        assert tables.render(text, path.name) == text, f"run python bench/readme_tables.py ({path.name} is stale)"


def test_every_table_is_marked_in_its_document():
    tables = _script()
    for path in tables.DOCUMENTS:
        text = path.read_text()
        for name in tables.TABLES_OF[path.name]:
            assert f"<!-- readme-table {name} -->" in text and f"<!-- /readme-table {name} -->" in text


def test_a_changed_result_changes_the_table(tmp_path):
    """The tables are computed from the files, not kept: edit ours' FID in a copy and the cell moves."""
    tables = _script()
    root = tmp_path / "results"
    root.mkdir()
    for path in tables.RESULTS.rglob("*.json"):
        target = root / path.relative_to(tables.RESULTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    doc = json.loads((root / "compare-4to32.json").read_text())
    ours = next(r for r in doc["policies"] if r["policy"] == "diffserve")
    ours["fid"], ours["fid_std"] = 30.0, 0.0
    for seed in ours["per_seed"]:
        seed["fid"] = 30.0
    (root / "compare-4to32.json").write_text(json.dumps(doc))
    readme = (ROOT / "README.md").read_text()
    changed = tables.render(readme, "README.md", root)
    assert changed != readme
    assert "**0 / 30.00" in changed and "**does NOT dominate**" in changed


def test_a_missing_marker_is_a_clear_error():
    tables = _script()
    with pytest.raises(SystemExit, match="no <!-- readme-table three-traces -->"):
        tables.render("no markers here", "README.md")
