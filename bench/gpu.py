"""One prepared GPU run: the paper's architectures (random weights, real architecture) on one GPU.

Measures, with the real commands (``diffserve profile``, ``plan``, ``serve --backend diffusers``):

1. the parameter count of every component of the five architectures (``unet_params``,
   ``text_encoder_params``, ``vae_params``);
2. ``profile`` of ``arch:sd-turbo`` and ``arch:sd-v1.5`` at 512 px, batch 1-32, and ``arch:sdxl``
   at 1024 px, batch 1-8 (30 steps, bfloat16: the published anchor's setting), eager; and with
   ``torch.compile`` at batch 1 and 8 (SDXL: 1), since every batch size compiles again;
3. k co-located SD-Turbo workers on the GPU, k = 1, 2, 4 (and SD v1.5 at k = 1, 2 for the server);
4. ``serve --backend diffusers`` on the arch cascade (SD-Turbo -> SD v1.5, two workers sharing the
   GPU) at 70 % of the capacity the plan predicts, for 60 s, driven by the official ``openai`` client.

and writes one JSON (default ``bench/results/gpu.json``) with images/s and p50/p99 latency per model
and batch next to the paper's A100 table and published A100 figures, then prints a short table.

Every figure is from **random weights, real architecture**: the same computation as the trained
models, not their images. The run fits in 8 minutes on one H100/H200-class GPU: items run in order of
value and each is skipped (and listed under ``skipped``) when the remaining budget cannot hold it.

``--dry-run`` runs the whole script on the CPU at 64 px with 1 step (batch 1-2 for SD-Turbo, 1 for
SD v1.5; float32), and warms up only the co-located workers (at one step a profile's warm-up run
would repeat its measured run); it checks the script, not the hardware, and the test suite runs it.
The items that check plumbing rather than a model take SDXS, the smallest architecture, in
SD-Turbo's place: the compiled profile (batch 1, with the ``eager`` compile backend: the compile
path without code generation), k = 2 co-located workers, and a 5 s server run on one worker of the
paper's SDXS -> SD v1.5 cascade (``reference-sdxs``). It leaves out SDXL (13.9 GiB in float32 on a
CPU; a profile would build it in each of its processes) and lists it under ``skipped``:
tests/test_arch_sdxl.py runs one real 64 px step of SDXL and SDXL-Lightning on the CPU instead, as
tests/test_arch.py does for SD-Turbo, SDXS and SD v1.5.

    python bench/gpu.py [--dry-run] [--out PATH] [--budget 450]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffserve.fileio import atomic_write_text, read_model  # noqa: E402
from diffserve.models.arch import ARCH_LABEL, ARCH_NAMES, component_params  # noqa: E402
from diffserve.schemas import ProfileFile  # noqa: E402

#: Published A100 figures the measurements are set against (quoted by issue #23).
ANCHORS = [
    {"model": "sd-turbo", "batch_size": 1, "steps": 1, "images_per_s": 21.0, "setting": "A100, torch.compile",
     "source": "published figure quoted in issue #23"},
    {"model": "sd-v1.5", "batch_size": 1, "steps": 50, "latency_ms": 1590.0, "setting": "A100, fp16, SDPA",
     "source": "published figure quoted in issue #23"},
    {"model": "sd-v1.5", "batch_size": 1, "steps": 50, "latency_ms": 1070.0, "setting": "A100, fp16, SDPA, torch.compile",
     "source": "published figure quoted in issue #23"},
    {"model": "sdxl", "batch_size": 1, "steps": 30, "latency_ms": 3300.0, "setting": "A100, bf16, SDPA",
     "source": "published figure quoted in issue #23"},
]
CLI = [sys.executable, "-m", "diffserve.cli.main"]


class Budget:
    """Wall-clock budget of the whole run; an item that cannot fit is skipped and listed."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.skipped: list[dict[str, str]] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, item: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.skipped.append({"item": item, "reason": f"budget: {self.left():.0f} s left, needs about {need_s:.0f} s"})
        return False


def _run(cmd: list[str], timeout_s: float, log: Path) -> None:
    """Run one diffserve command; its output goes to ``log``; a failure raises with the log's tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=max(1.0, timeout_s), cwd=REPO)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[3:6])} failed (exit {proc.returncode}):\n{tail}")


class Setup:
    """What differs between a GPU run and the CPU dry run."""

    def __init__(self, dry_run: bool) -> None:
        self.dry = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.small_ladder = "1,2" if dry_run else "1,2,4,8,16,32"
        self.sdxl_ladder = "1" if dry_run else "1,2,4,8"
        self.colocate = "2" if dry_run else "1,2,4"
        self.repeats = 1 if dry_run else 3
        # a warm-up is a one-step run; at the dry run's one step it would repeat the measured run exactly
        self.warmup = 0 if dry_run else 1
        self.serve_s = 5.0 if dry_run else 60.0
        self.compile = "default"
        self.compile_backend = "eager" if dry_run else "inductor"
        # the light model of the plumbing items (compile, co-location, serve): SD-Turbo on a GPU; the
        # dry run, which checks the path and not the model, takes SDXS, the smallest architecture
        # (a third of SD-Turbo's parameters, a tiny VAE), and serves the paper's SDXS -> SD v1.5 cascade
        self.light = "sdxs" if dry_run else "sd-turbo"
        self.cascade = "reference-sdxs" if dry_run else "reference"

    def variant(self, name: str, *, compiled: bool = False) -> dict[str, Any]:
        """The variant file entry of ``arch:name`` for this run (the real settings on a GPU)."""
        v: dict[str, Any] = {"name": name, "source": f"arch:{name}"}
        gpu: dict[str, Any] = {"sdpa": True, "channels_last": True, "same_stream_decode": True, "pinned_outputs": True}
        if compiled:
            gpu.update(compile=self.compile, compile_backend=self.compile_backend)
        from diffserve.models.arch import arch_config

        cfg = arch_config(name)
        v.update(pipeline_class=cfg["pipeline_class"], guidance_scale=cfg["guidance_scale"], steps=cfg["steps"],
                 resolution=cfg["resolution"], dtype="float16", gpu=gpu)
        if name == "sdxl":
            v.update(steps=30, dtype="bfloat16")  # the published A100 anchor: 30 steps, bf16
        if self.dry:  # float32: CPUs without native bfloat16 (AVX2) run it several times faster
            v.update(steps=1, resolution=64, dtype="float32")
        return v


def _write_variants(path: Path, variants: list[dict[str, Any]]) -> Path:
    atomic_write_text(path, yaml.safe_dump({"variants": variants}, sort_keys=False))
    return path


def profile_rows(profile: ProfileFile, compiled: bool) -> list[dict[str, Any]]:
    out = []
    for m in profile.models.values():
        out.append({
            "model": m.name, "source": m.source, "label": m.label, "compile": "on" if compiled else "off",
            "steps": m.steps, "resolution": m.resolution, "load_s": m.load_time_s, "gpu_options": m.gpu_options,
            "batches": [
                {"batch_size": b.batch_size, "images_per_s": b.throughput_ips, "p50_ms": b.median_ms, "p99_ms": b.p99_ms,
                 "peak_memory_mb": b.peak_memory_mb} if b.feasible else {"batch_size": b.batch_size, "infeasible": b.reason}
                for b in m.batches
            ],
        })
    return out


def merge_colocated(eager_path: Path, coloc_path: Path, out: Path) -> Path:
    """The server's profile: the eager ladders, each model with its co-located rows where it has
    them, and a model profiled only co-located (the dry run's light model) as measured there."""
    eager = read_model(eager_path, ProfileFile, what="profile")
    extra = read_model(coloc_path, ProfileFile, what="profile").models
    merged = {n: m.model_copy(update={"colocated": extra[n].colocated}) if n in extra else m for n, m in eager.models.items()}
    merged.update({n: m for n, m in extra.items() if n not in merged})
    atomic_write_text(out, yaml.safe_dump(eager.model_copy(update={"models": merged}).model_dump(mode="json"), sort_keys=False))
    return out


def paper_table() -> dict[str, list[dict[str, Any]]]:
    """The paper's A100 table (the reference profile, transcribed from the artifact)."""
    from diffserve.artifacts import load_profile

    ref = load_profile("reference")
    return {
        name: [{"batch_size": b.batch_size, "p50_ms": b.median_ms, "images_per_s": b.throughput_ips}
               for b in m.batches if b.feasible]
        for name, m in ref.models.items()
    }


def serve_run(setup: Setup, profile_path: Path, work: Path, duration_s: float, log: Path, ready_s: float = 600.0) -> dict[str, Any]:
    """Plan the arch cascade (``setup.cascade``), serve it with the diffusers backend, drive it with the openai client."""
    import openai

    from diffserve.evaluation.compare import ServerProcess
    from diffserve.ports import free_port

    plan_path = work / "plan.yaml"
    plan_cmd = [*CLI, "plan", "--profile", str(profile_path), "--cascade", setup.cascade, "--slo", "5s" if not setup.dry else "120s",
                "--demand", "0.1", "--output", str(plan_path)]
    serve_extra: list[str]
    if setup.dry:
        plan_cmd += ["--workers", "1"]
        serve_extra = ["--workers", "1", "--device", "cpu"]
    else:  # one GPU counted as two co-located workers, each holding both models
        plan_cmd += ["--workers", "1", "--workers-per-gpu", "2"]
        serve_extra = ["--workers", "2", "--workers-per-gpu", "2", "--device", "cuda"]
    _run(plan_cmd, 120, log)
    from diffserve.schemas import PlanFile

    capacity = read_model(plan_path, PlanFile, what="plan").predicted.get("capacity_qps", 0.0)
    demand = max(0.05, round(0.7 * capacity, 3))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*CLI, "serve", "--backend", "diffusers", "--profile", str(profile_path), "--cascade", setup.cascade,
           "--slo", "5s" if not setup.dry else "120s", "--demand", f"{demand:g}", *serve_extra,
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    with ServerProcess(cmd, url, work / "serve.log") as server:
        server.wait_ready(ready_s)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        rng = np.random.default_rng(0)

        def one(i: int) -> None:
            t0 = time.monotonic()
            try:
                client.images.generate(prompt=f"a photograph of object {i} on a table", n=1, size="512x512" if not setup.dry else "64x64")
                status = "200"
            except openai.APIStatusError as exc:
                status = str(exc.status_code)
            except openai.APIError as exc:
                status = type(exc).__name__
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == "200":
                    latencies.append((time.monotonic() - t0) * 1000.0)

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
            at, i, futures = 0.0, 0, []
            while at < duration_s:
                time.sleep(max(0.0, start + at - time.monotonic()))
                futures.append(pool.submit(one, i))
                i += 1
                at += float(rng.exponential(1.0 / demand))
            concurrent.futures.wait(futures)
        wall = time.monotonic() - start
    ok = len(latencies)
    return {
        "label": ARCH_LABEL, "backend": "diffusers", "cascade": f"{setup.cascade} ({setup.light} -> sd-v1.5 curves of the paper)",
        "workers": serve_extra[1], "demand_qps": demand, "plan_capacity_qps": capacity, "duration_s": round(wall, 1),
        "requests": i, "statuses": statuses, "images_per_s": round(ok / wall, 3),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if ok else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 1) if ok else None,
    }


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(dry_run: bool, out: Path, budget_s: float) -> dict[str, Any]:
    setup = Setup(dry_run)
    budget = Budget(budget_s)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="diffserve-gpu-bench-"))
    log = work / "commands.log"
    import diffusers
    import torch

    from diffserve.sharing import sharing_mode

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU (use --dry-run to check the script on a CPU)")
    result: dict[str, Any] = {
        "label": ARCH_LABEL, "dry_run": dry_run, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(), "device": torch.cuda.get_device_name(0) if not dry_run else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "sharing": sharing_mode(setup.device),
        "budget_s": budget_s, "models": {n: component_params(n) for n in ARCH_NAMES},
        "profiles": [], "colocated": [], "serve": None, "anchors": ANCHORS, "paper_a100": paper_table(), "work_dir": str(work),
    }
    threads = ["--threads", "1"] if dry_run else []
    eager_profile = work / "profile-eager.yaml"

    def profile(item: str, names: list[str], ladder: str, output: Path, need_s: float, *, compiled: bool = False,
                extra: list[str] = (), warmup: int | None = None) -> ProfileFile | None:
        if not budget.allows(item, need_s):
            return None
        variants = _write_variants(work / f"{output.stem}-{'-'.join(names)}.yaml", [setup.variant(n, compiled=compiled) for n in names])
        cmd = [*CLI, "profile", "--models", str(variants), "--batch-sizes", ladder, "--repeats", str(setup.repeats),
               "--warmup", str(setup.warmup if warmup is None else warmup), "--device", setup.device, "--output", str(output), "--resume", "--time-limit", "120s", "--edit-strength", "0", *threads, *extra]
        _run(cmd, budget.left(), log)
        return read_model(output, ProfileFile, what="profile")

    # in order of value: each eager ladder, then its compiled counterpart (a recompile per batch
    # size, so the compiled ladders are 1 and 8: the published anchors are at batch 1)
    compiled_ladder = "1" if dry_run else "1,8"

    def compiled(name: str, need_s: float) -> None:
        if dry_run:  # one compiled profile checks the path: the light model's, in SD-Turbo's place
            if name != "sd-turbo":
                return
            name = setup.light
        p = profile(f"profile {name} torch.compile", [name], "1" if name == "sdxl" else compiled_ladder,
                    work / f"profile-{name}-compiled.yaml", need_s, compiled=True)
        if p is not None:
            result["profiles"] += profile_rows(p, True)

    profile("profile sd-turbo eager b1-32", ["sd-turbo"], setup.small_ladder, eager_profile, 45)
    compiled("sd-turbo", 90)
    profile("profile sd-v1.5 eager b1-32", ["sd-v1.5"], "1" if dry_run else setup.small_ladder, eager_profile, 100)
    if eager_profile.exists():
        result["profiles"] += profile_rows(read_model(eager_profile, ProfileFile, what="profile"), False)
    compiled("sd-v1.5", 60)
    sdxl = None if dry_run else profile("profile sdxl eager b1-8", ["sdxl"], setup.sdxl_ladder, work / "profile-sdxl.yaml", 80)
    if sdxl is not None:
        result["profiles"] += profile_rows(sdxl, False)

    # co-located workers: the server's profile gets k = 1, 2 (4) rows
    coloc = work / "profile-colocated.yaml"
    # warm-up 1 in the dry run too: the co-located workers' warm-up loop is code of its own, which
    # no other item runs
    p = profile(f"co-located {setup.light} k={setup.colocate}", [setup.light], "1", coloc, 60, warmup=1,
                extra=["--colocate", setup.colocate, "--colocate-batch-sizes", "1" if dry_run else "1,4"])
    if not dry_run:
        profile("co-located sd-v1.5 k=1,2", ["sd-v1.5"], "1", coloc, 60, extra=["--colocate", "1,2", "--colocate-batch-sizes", "1"])
    if coloc.exists():
        for m in read_model(coloc, ProfileFile, what="profile").models.values():
            result["colocated"] += [{"model": m.name, **c.model_dump()} for c in m.colocated]

    # the server on the arch cascade
    serve_profile = eager_profile
    if coloc.exists() and eager_profile.exists():
        serve_profile = merge_colocated(eager_profile, coloc, work / "profile-serve.yaml")
    if eager_profile.exists() and budget.allows("serve --backend diffusers", setup.serve_s + 60):
        try:
            ready_s = 1800.0 if dry_run else max(30.0, budget.left() - setup.serve_s - 10)
            result["serve"] = serve_run(setup, serve_profile, work, setup.serve_s, log, ready_s)
        except Exception as exc:  # noqa: BLE001 - recorded; the compiled profiles still run
            result["serve"] = {"error": f"{type(exc).__name__}: {exc}"}

    compiled("sdxl", 60)
    if dry_run:
        result["skipped"] = [{"item": "profile sdxl", "reason": "--dry-run: SDXL on a CPU needs 13.9 GiB in float32 per profiling "
                              "process; tests/test_arch_sdxl.py runs one real 64 px step of SDXL and SDXL-Lightning instead"},
                             {"item": "profile sd-turbo / sd-v1.5 / sdxl torch.compile",
                              "reason": "--dry-run compiles sdxs only (same code path, the smallest UNet to trace)"},
                             {"item": "co-located sd-turbo / sd-v1.5", "reason": "--dry-run co-locates k = 2 sdxs workers (same "
                              "code path, the smallest model) and serves one CPU worker, which needs no co-located rows"}]
    result.setdefault("skipped", [])
    result["skipped"] += budget.skipped
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['device']} ({result['label']}{', DRY RUN on CPU' if result['dry_run'] else ''}); {result['elapsed_s']} s")
    print(f"{'model':<10} {'compile':>7} {'batch':>5} {'img/s':>8} {'p50 ms':>9} {'p99 ms':>9}   paper A100 p50 ms")
    for row in result["profiles"]:
        paper = {b["batch_size"]: b["p50_ms"] for b in result["paper_a100"].get(row["model"], [])}
        for b in row["batches"]:
            if "infeasible" in b:
                print(f"{row['model']:<10} {row['compile']:>7} {b['batch_size']:>5} {'-':>8} {'-':>9} {'-':>9}   {b['infeasible'][:40]}")
                continue
            ref = paper.get(b["batch_size"])
            print(f"{row['model']:<10} {row['compile']:>7} {b['batch_size']:>5} {b['images_per_s']:>8.2f} {b['p50_ms']:>9.1f} "
                  f"{b['p99_ms']:>9.1f}   {'-' if ref is None else f'{ref:.0f}'}")
    for c in result["colocated"]:
        print(f"co-located {c['model']} k={c['workers']} batch {c['batch_size']} ({c['sharing']}): "
              f"{c['throughput_ips']:.2f} img/s aggregate, p50 {c['median_ms']:.1f} ms")
    if result["serve"]:
        print("serve:", json.dumps(result["serve"]))
    for s in result["skipped"]:
        print(f"skipped: {s['item']} ({s['reason']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, 64 px, 1 step: checks the script, not the hardware")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write (default bench/results/gpu.json, or gpu-dry-run.json)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 450 on a GPU; 7200 dry, which checks the script, not the time)")
    args = parser.parse_args(argv)
    out = args.out or REPO / "bench" / "results" / ("gpu-dry-run.json" if args.dry_run else "gpu.json")
    budget = args.budget if args.budget is not None else (7200.0 if args.dry_run else 450.0)
    result = run(args.dry_run, out, budget)
    print_table(result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
