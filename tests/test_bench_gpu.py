"""bench/gpu.py: its GPU settings, its time budget, and the whole script as a CPU dry run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench_helpers import REPO, bench_script


def _bench():
    return bench_script("gpu")


def test_gpu_run_uses_the_real_settings_and_the_anchor_settings():
    bench = _bench()
    gpu = bench.Setup(dry_run=False)
    turbo, sd15, sdxl = gpu.variant("sd-turbo"), gpu.variant("sd-v1.5"), gpu.variant("sdxl", compiled=True)
    assert (turbo["steps"], turbo["guidance_scale"], turbo["resolution"], turbo["dtype"]) == (1, 0.0, 512, "float16")
    assert (sd15["steps"], sd15["guidance_scale"]) == (50, 7.5)
    assert (sdxl["steps"], sdxl["dtype"], sdxl["resolution"]) == (30, "bfloat16", 1024)  # the A100 anchor's setting
    assert sdxl["gpu"]["compile"] == "default" and sdxl["gpu"]["compile_backend"] == "inductor"
    assert turbo["gpu"]["sdpa"] and turbo["gpu"]["pinned_outputs"] and "compile" not in turbo["gpu"]
    assert gpu.small_ladder == "1,2,4,8,16,32" and gpu.sdxl_ladder == "1,2,4,8" and gpu.colocate == "1,2,4"
    assert (gpu.light, gpu.cascade) == ("sd-turbo", "reference")  # the GPU run measures the paper's cascade
    assert (gpu.repeats, gpu.warmup, gpu.serve_s) == (3, 1, 60.0)
    dry_setup = bench.Setup(dry_run=True)
    dry = dry_setup.variant("sd-turbo", compiled=True)
    assert (dry["resolution"], dry["steps"], dry["gpu"]["compile_backend"]) == (64, 1, "eager")
    assert (dry_setup.light, dry_setup.cascade) == ("sdxs", "reference-sdxs")


def test_budget_skips_and_lists_what_does_not_fit():
    bench = _bench()
    budget = bench.Budget(10.0)
    assert budget.allows("small", 5.0)
    assert not budget.allows("profile sdxl", 60.0)
    assert budget.skipped[0]["item"] == "profile sdxl" and "budget" in budget.skipped[0]["reason"]


def _profile(path, models: dict[str, list]) -> None:
    from diffserve.fileio import write_model
    from diffserve.schemas import BatchProfile, ColocatedBatch, ModelProfile, ProfileFile

    write_model(path, ProfileFile(device="cpu", models={
        name: ModelProfile(name=name, source=f"arch:{name}", batches=[BatchProfile(batch_size=1, median_ms=100.0)],
                           colocated=[ColocatedBatch(workers=k, batch_size=1, sharing="cpu", median_ms=150.0, throughput_ips=5.0)
                                      for k in ks])
        for name, ks in models.items()}))


def test_server_profile_keeps_every_eager_model_and_adds_the_colocated_rows(tmp_path):
    """A model without co-located rows (its co-location item skipped) stays in the server's
    profile; a model profiled only co-located (the dry run's light model) joins it."""
    from diffserve.fileio import read_model
    from diffserve.schemas import ProfileFile

    eager, coloc = tmp_path / "eager.yaml", tmp_path / "coloc.yaml"
    _profile(eager, {"sd-turbo": [], "sd-v1.5": []})
    _profile(coloc, {"sd-turbo": [1, 2], "sdxs": [2]})
    merged = read_model(_bench().merge_colocated(eager, coloc, tmp_path / "serve.yaml"), ProfileFile, what="profile")
    assert {n: [c.workers for c in m.colocated] for n, m in merged.models.items()} == {"sd-turbo": [1, 2], "sd-v1.5": [], "sdxs": [2]}


@pytest.mark.slow
def test_dry_run_runs_the_whole_script_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=3600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["label"] == "random weights, real architecture"
    for name in ("sd-turbo", "sdxs", "sd-v1.5", "sdxl-lightning", "sdxl"):
        assert set(result["models"][name]) == {"unet_params", "text_encoder_params", "vae_params"}
    assert result["models"]["sdxl"]["unet_params"] == pytest.approx(2.567e9, rel=0.005)
    rows = {(r["model"], r["compile"]): r for r in result["profiles"]}
    assert {("sd-turbo", "off"), ("sd-v1.5", "off"), ("sdxs", "on")} <= set(rows)
    eager = rows[("sd-turbo", "off")]
    assert [b["batch_size"] for b in eager["batches"]] == [1, 2]
    assert all(b["images_per_s"] > 0 and b["p99_ms"] >= b["p50_ms"] for b in eager["batches"])
    assert eager["label"] == "random weights, real architecture" and eager["resolution"] == 64
    assert eager["gpu_options"]["sdpa"] and eager["gpu_options"]["same_stream_decode"]
    assert rows[("sdxs", "on")]["gpu_options"]["compile"] == "default"
    assert rows[("sdxs", "on")]["gpu_options"]["compile_backend"] == "eager"
    assert [(c["model"], c["workers"], c["sharing"]) for c in result["colocated"]] == [("sdxs", 2, "cpu")]
    serve = result["serve"]
    assert "error" not in serve, serve
    assert serve["cascade"].startswith("reference-sdxs (sdxs -> sd-v1.5")
    assert serve["statuses"].get("200", 0) >= 1 and serve["images_per_s"] > 0
    assert {a["model"] for a in result["anchors"]} == {"sd-turbo", "sd-v1.5", "sdxl"}
    assert result["paper_a100"]["sd-turbo"][0]["batch_size"] == 1
    assert any(s["item"] == "profile sdxl" for s in result["skipped"])
    assert "wrote" in proc.stdout
