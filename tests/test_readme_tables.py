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
    with pytest.raises(SystemExit, match=f"no <!-- readme-table {tables.TABLES_OF['README.md'][0]} -->"):
        tables.render("no markers here", "README.md")


def _copy_results(tables, tmp_path) -> Path:
    root = tmp_path / "results"
    for path in tables.RESULTS.rglob("*.json"):
        target = root / path.relative_to(tables.RESULTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    return root


def test_the_class_mix_table_and_its_checks_come_from_the_file(tmp_path):
    """Issue #24's table: every row from one committed run; worsen ours' interactive FID and the checks say so."""
    tables = _script()
    root = _copy_results(tables, tmp_path)
    doc = json.loads((root / tables.CLASS_MIX).read_text())
    assert {r["policy"] for r in doc["policies"]} == {"single-class", "diffserve-fifo", "diffserve"}
    before = tables.class_mix_table(root)
    assert "does not hold" not in before
    ours = next(r for r in doc["policies"] if r["policy"] == "diffserve")
    ours["classes"]["interactive"]["fid"], ours["classes"]["interactive"]["fid_std"] = 30.0, 0.0
    (root / tables.CLASS_MIX).write_text(json.dumps(doc))
    after = tables.class_mix_table(root)
    assert "| **diffserve (ours)** | **interactive (2.5 s)** | 0 | 30.00 |" in after
    # worse than FIFO's and single-class's interactive FID; batch's FID is then below it
    assert after.count("**does not hold**") == 2
    (root / tables.CLASS_MIX).unlink()
    assert "not run" in tables.class_mix_table(root)


def test_the_disconnect_table_recomputes_the_saving_from_the_file(tmp_path):
    tables = _script()
    root = _copy_results(tables, tmp_path)
    doc = json.loads((root / tables.CLASS_MIX_DISCONNECT).read_text())
    assert [r["policy"] for r in doc["policies"]] == ["diffserve", "diffserve-no-cancel"]
    assert all(r["ledger_holds"] and r["status_500"] == 0 for r in doc["policies"])
    assert doc["policies"][0]["heavy_jobs_gone_before_start"] == 0  # with cancellation no departed client's job starts
    doc["heavy_gpu_seconds_saved_share"] = 0.5
    (root / tables.CLASS_MIX_DISCONNECT).write_text(json.dumps(doc))
    assert "cancellation are 50.0 % (per seed" in tables.class_mix_disconnect_table(root)


def _cell(*policies: str, **over) -> dict:
    doc = {"trace": "maf_trace_4to32qps.txt", "workers": 4, "slo_ms": 5000.0, "clock": "virtual", "speedup": None,
           "seeds": [0, 1, 2], "arrivals": "resample-times", "oracle": {"fid": 19.35}, "policies": [{"policy": p} for p in policies]}
    return {**doc, **over}


def test_a_cell_finished_in_parts_merges_only_when_the_parts_saw_the_same_requests():
    tables = _script()
    merged = tables.merge([_cell("diffserve", "static"), _cell("proteus", trace="maf-4to32 (the artifact's maf_trace_4to32qps.txt)")])
    assert [r["policy"] for r in merged["policies"]] == ["static", "proteus", "diffserve"]  # table order
    for over in ({"workers": 8}, {"seeds": [0, 1]}, {"arrivals": "resample"}, {"oracle": {"fid": 19.4}}, {"trace": "maf_trace_1to8qps.txt"}):
        with pytest.raises(ValueError, match=next(iter(over))):
            tables.merge([_cell("static"), _cell("proteus", **over)])
