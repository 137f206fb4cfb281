"""``diffserve profile``: the measuring loop, infeasible batches, resume, the CLI and import-csv."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffserve.cli.main import app
from diffserve.errors import UserError
from diffserve.fileio import dump_yaml, read_model, write_model
from diffserve.models import GenerationTimeout, resolve_variants
from diffserve.profiler import Limits, ProfileSettings, measure_batch, measure_ladder, profile_variants
from diffserve.schemas import ProfileFile

runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# the measuring loop, with fakes
# ---------------------------------------------------------------------------------------------


class FakeProbe:
    def __init__(self, mb_per_image: float = 10.0) -> None:
        self.mb_per_image, self.last = mb_per_image, 0
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def peak_mb(self) -> float:
        return 100 + self.mb_per_image * self.last


class FakeModel:
    """A 'model' whose batch takes ``cost(b)`` seconds on a fake clock; may raise at some sizes."""

    def __init__(self, cost, fail_at: int | None = None, exc: BaseException | None = None, probe: FakeProbe | None = None):
        self.now = 0.0
        self.calls: list[int] = []
        self.cost, self.fail_at, self.exc, self.probe = cost, fail_at, exc, probe

    def clock(self) -> float:
        return self.now

    def run(self, batch_size: int, deadline: float | None, *, warmup: bool = False) -> None:
        self.calls.append(batch_size)
        self.warmups = getattr(self, "warmups", 0) + warmup
        if self.probe is not None:
            self.probe.last = batch_size
        if self.fail_at is not None and batch_size >= self.fail_at:
            raise self.exc  # type: ignore[misc]
        self.now += self.cost(batch_size, len(self.calls))


def test_statistics_skip_warmup_and_use_every_repeat():
    durations = iter([9.0, 0.1, 0.2, 0.3, 0.4, 1.0])  # the first (9 s) is the warm-up
    fake = FakeModel(lambda b, n: next(durations))
    result = measure_batch(fake.run, 4, repeats=5, warmup=1, limits=Limits(), probe=FakeProbe(), clock=fake.clock)
    assert result.feasible and result.repeats == 5 and fake.calls == [4] * 6 and fake.warmups == 1
    assert result.median_ms == pytest.approx(300)
    assert result.p90_ms == pytest.approx(760)  # numpy linear interpolation of 100..400, 1000
    assert result.p99_ms == pytest.approx(976)
    assert result.throughput_ips == pytest.approx(4 / 0.3, rel=1e-3)
    assert result.peak_memory_mb == pytest.approx(100)


def test_simulated_oom_marks_that_size_and_larger_infeasible():
    import torch

    probe = FakeProbe()
    fake = FakeModel(lambda b, n: 0.01 * b, fail_at=4, exc=torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), probe=probe)
    seen = []
    results = measure_ladder(
        fake.run, [8, 1, 2, 4, 16], repeats=2, warmup=1, limits=Limits(), probe=probe, clock=fake.clock,
        on_batch=lambda r, measured: seen.append((r.batch_size, measured)),
    )
    assert [(r.batch_size, r.feasible) for r in results] == [(1, True), (2, True), (4, False), (8, False), (16, False)]
    assert results[2].reason.startswith("out of memory: CUDA out of memory")
    assert results[3].reason.startswith("larger than infeasible batch 4")
    assert max(fake.calls) == 4  # 8 and 16 never ran
    assert seen == [(1, True), (2, True), (4, True), (8, True), (16, True)]
    assert results[1].peak_memory_mb == pytest.approx(120)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"), "out of memory"),
        (MemoryError(), "out of memory"),
        (GenerationTimeout("deadline passed after denoising step 1"), "time limit"),
        (ValueError("height must be divisible by 8 but is 65"), "failed: ValueError: height must be divisible by 8"),
    ],
)
def test_failures_become_reasons_not_crashes(exc, reason):
    fake = FakeModel(lambda b, n: 0.01, fail_at=2, exc=exc)
    results = measure_ladder(fake.run, [1, 2, 4], repeats=1, warmup=0, limits=Limits(time_limit_s=5), probe=FakeProbe(), clock=fake.clock)
    assert [r.feasible for r in results] == [True, False, False]
    assert results[1].reason.startswith(reason)


def test_time_and_memory_limits():
    fake = FakeModel(lambda b, n: 0.5 * b)
    results = measure_ladder(fake.run, [1, 2, 4], repeats=3, warmup=1, limits=Limits(time_limit_s=1.5), probe=FakeProbe(), clock=fake.clock)
    assert [r.feasible for r in results] == [True, True, False]
    assert results[2].reason == "time limit: 2.00 s > 1.5 s"
    assert fake.calls.count(4) == 1  # stopped at the first run over the limit

    probe = FakeProbe(mb_per_image=50)
    fake = FakeModel(lambda b, n: 0.01, probe=probe)
    results = measure_ladder(fake.run, [1, 2, 4], repeats=1, warmup=0, limits=Limits(memory_limit_mb=180), probe=probe, clock=fake.clock)
    assert [r.feasible for r in results] == [True, False, False]
    assert results[1].reason == "memory limit: peak 200 MB > 180 MB"


# ---------------------------------------------------------------------------------------------
# profile_variants: resume and interruption, with a fake loader
# ---------------------------------------------------------------------------------------------


class CountingModel:
    def __init__(self, spec, interrupt_at: int | None = None) -> None:
        self.spec, self.device, self.load_time_s, self.random_weights = spec, "cpu", 0.25, True
        self.interrupt_at = interrupt_at
        self.sizes: list[int] = []

    def generate(self, prompts, seeds=None, *, deadline=None, steps=None):
        if self.interrupt_at is not None and len(prompts) >= self.interrupt_at:
            raise KeyboardInterrupt
        self.sizes.append(len(prompts))
        return [None] * len(prompts)


def test_resume_keeps_measured_batches_and_survives_interruption(tmp_path):
    out = tmp_path / "profile.yaml"
    spec = resolve_variants("tiny-turbo")[0]
    loaded: list[CountingModel] = []

    def loader(interrupt_at=None):
        def load(s, device):
            loaded.append(CountingModel(s, interrupt_at))
            return loaded[-1]

        return load

    settings = ProfileSettings(batch_sizes=(1, 2, 4), repeats=2, warmup=0, device="cpu", loader=loader(interrupt_at=4))
    with pytest.raises(KeyboardInterrupt):
        profile_variants([spec], out, settings)
    partial = read_model(out, ProfileFile)  # written atomically after every batch size
    assert [b.batch_size for b in partial.model("tiny-turbo").batches] == [1, 2]

    settings = ProfileSettings(batch_sizes=(1, 2, 4, 8), repeats=2, warmup=0, device="cpu", resume=True, loader=loader())
    final = profile_variants([spec], out, settings)
    assert loaded[-1].sizes == [4, 4, 8, 8]  # only what was missing
    assert final.model("tiny-turbo").batches[:2] == partial.model("tiny-turbo").batches
    assert [b.batch_size for b in read_model(out, ProfileFile).model("tiny-turbo").batches] == [1, 2, 4, 8]
    assert final.random_weights and final.device.startswith("cpu")

    n_loads = len(loaded)
    profile_variants([spec], out, settings)  # everything known: the model is not even loaded
    assert len(loaded) == n_loads

    moved = final.model_copy(update={"device": "NVIDIA A100-SXM4-80GB"})
    write_model(out, moved)
    with pytest.raises(UserError, match="cannot resume .* measured on 'NVIDIA A100-SXM4-80GB'"):
        profile_variants([spec], out, settings)


# ---------------------------------------------------------------------------------------------
# the CLI on the real tiny zoo
# ---------------------------------------------------------------------------------------------


def _invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.slow
@pytest.mark.e2e
def test_profile_builtin_zoo_end_to_end(zoo_cache, tmp_path):
    out = tmp_path / "profile.yaml"
    result = _invoke("profile", "--models", "builtin", "-b", "1,2", "--repeats", "1", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "RANDOM WEIGHTS" in result.output and "tiny-base" in result.output
    profile = read_model(out, ProfileFile)
    assert list(profile.models) == ["tiny-turbo", "tiny-small", "tiny-base"]
    assert profile.random_weights and profile.device_type == "cpu" and profile.torch_version
    for model in profile.models.values():
        assert model.random_weights and model.load_time_s > 0
        assert [(b.batch_size, b.feasible, b.repeats) for b in model.batches] == [(1, True, 1), (2, True, 1)]
        assert all(b.peak_memory_mb > 0 and b.throughput_ips > 0 for b in model.batches)
    # each entry measured its own model (which one is faster is a timing, not asserted on a shared host)
    assert {n: (m.source, m.steps) for n, m in profile.models.items()} == {
        "tiny-turbo": ("builtin:tiny-turbo", 1), "tiny-small": ("builtin:tiny-small", 4), "tiny-base": ("builtin:tiny-base", 25)}
    # schema round trip: the file reads back equal and rewrites byte for byte
    assert dump_yaml(profile) == out.read_text()
    assert read_model(write_model(tmp_path / "again.yaml", profile), ProfileFile) == profile


def test_tiny_time_limit_makes_real_batches_infeasible(zoo_cache, tmp_path):
    out = tmp_path / "p.yaml"
    result = _invoke("profile", "--models", "tiny-base", "-b", "1,2,4", "-r", "1", "--time-limit", "1ms", "-o", str(out))
    assert result.exit_code == 0, result.output
    batches = read_model(out, ProfileFile).model("tiny-base").batches
    assert [b.feasible for b in batches] == [False, False, False]
    assert batches[0].reason.startswith("time limit")
    assert batches[2].reason.startswith("larger than infeasible batch 1")


def test_memory_limit_flag(zoo_cache, tmp_path):
    out = tmp_path / "p.yaml"
    result = _invoke("profile", "-m", "tiny-turbo", "-b", "1,2", "-r", "1", "--warmup", "0", "--memory-limit", "1", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert [b.reason.split(":")[0] for b in read_model(out, ProfileFile).model("tiny-turbo").batches] == [
        "memory limit", "larger than infeasible batch 1 (memory limit"
    ]


def _bad_variant(tmp_path: Path, **fields: str) -> str:
    base = {"name": "bad", "source": "builtin:tiny-turbo", "steps": "1", "guidance_scale": "0", "resolution": "64"}
    path = tmp_path / "variant.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in {**base, **fields}.items()))
    return str(path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": "s3://bucket/model"}, "unknown model source 's3://bucket/model'"),
        ({"source": "diffserve-test/not-cached"}, "not in the local Hugging Face cache and the machine is offline"),
        ({"source": "/no/such/model/dir"}, "local model not found: /no/such/model/dir"),
        ({"pipeline_class": "FancyPipeline"}, "unknown pipeline class 'FancyPipeline'"),
        ({"dtype": "float16", "device": "cpu"}, "dtype float16 is not supported on device cpu"),
        ({"steps": "0"}, "steps"),
    ],
)
def test_bad_variants_give_one_line_and_exit_2(fields, message, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "p.yaml"
    result = _invoke("profile", "--models", _bad_variant(tmp_path, **fields), "-b", "1", "-o", str(out))
    assert result.exit_code == 2
    assert message in result.output and "error:" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "no-such-model"], "unknown model 'no-such-model'"),
        (["--models", "builtin:tiny-nope"], "unknown model 'builtin:tiny-nope'"),
        (["--batch-sizes", "1,x"], "--batch-sizes must be a comma-separated list of integers"),
        (["--time-limit", "soon"], "--time-limit must look like 5s"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(args, message, tmp_path):
    result = _invoke("profile", *args, "-o", str(tmp_path / "p.yaml"))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# import-csv and show
# ---------------------------------------------------------------------------------------------


#: ms per batch of 1, 2, 4, 8, 16, 32 as ../shared/reference/README.md lists them (None: infeasible);
#: an independent reading of the artifact's CSVs to check the importer against.
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
A100_LATENCY_MS = {
    "sd-turbo": (100, 150, 220, 410, 770, 1560),
    "sdxs": (50, 60, 80, 130, 240, 480),
    "sd-v1.5": (1780, 2160, 3680, 6790, 12880, 25350),
    "sdxl-lightning": (550, 980, 1850, 3580, 7100, None),
    "sdxl": (6100, 10650, 20920, 40230, 79110, None),
}


def test_import_csv_reproduces_the_published_figures(reference_dir, tmp_path):
    out = tmp_path / "artifact.yaml"
    files = sorted(str(p) for p in (reference_dir / "profiles").glob("stable_diffusion_runtimes_*.csv"))
    assert len(files) == 3
    result = _invoke("profile", "import-csv", *files, "-o", str(out))
    assert result.exit_code == 0, result.output
    profile = read_model(out, ProfileFile)
    assert set(profile.models) == set(A100_LATENCY_MS)
    for name, published in A100_LATENCY_MS.items():
        model = profile.model(name)
        for size, ms in zip(BATCH_SIZES, published):
            batch = next(b for b in model.batches if b.batch_size == size)
            assert batch.feasible == (ms is not None), (name, size)
            if ms is not None:
                assert batch.median_ms == ms
    assert "accel onnxruntime_gpu_ampere" in profile.source


def test_import_csv_names_and_errors(reference_dir, tmp_path):
    sdxs = str(reference_dir / "profiles" / "stable_diffusion_runtimes_sdxs.csv")
    out = tmp_path / "p.yaml"
    result = _invoke("profile", "import-csv", sdxs, "--light", "my-light", "--heavy", "my-heavy", "--accel", "onnxruntime_cpu", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert read_model(out, ProfileFile).model("my-light").latency_ms(1) == 50

    result = _invoke("profile", "import-csv", sdxs, "--accel", "tpu_v5", "-o", str(out))
    assert result.exit_code == 2 and "accel 'tpu_v5' is not in" in result.output

    odd = tmp_path / "runtimes.csv"
    odd.write_text(",Model,Accel,batchsize,avg_runtime,50th_pct,90th_pct,95th_pct\n0,sdturbo,x,1,5,5,5,5\n")
    result = _invoke("profile", "import-csv", str(odd), "-o", str(out))
    assert result.exit_code == 2 and "pass --light and --heavy" in result.output

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    result = _invoke("profile", "import-csv", str(bad), "--light", "a", "--heavy", "b", "-o", str(out))
    assert result.exit_code == 2 and "missing column(s)" in result.output


def test_show_reference():
    result = _invoke("profile", "show", "reference")
    assert result.exit_code == 0
    assert "sd-v1.5" in result.output and "25,350" in result.output and "arXiv 2411.15381" in result.output


# ---------------------------------------------------------------------------------------------
# one real process, as a user runs it
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.e2e
def test_profile_in_a_real_subprocess(zoo_cache, tmp_path):
    out = tmp_path / "profile.yaml"
    env = {**os.environ, "DIFFSERVE_CACHE": str(zoo_cache), "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    proc = subprocess.run(
        [sys.executable, "-m", "diffserve.cli.main", "profile", "--models", "tiny-turbo", "-b", "1", "-r", "1", "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tiny-turbo" in proc.stdout and "RANDOM WEIGHTS" in proc.stdout + proc.stderr
    assert read_model(out, ProfileFile).model("tiny-turbo").latency_ms(1) > 0


# ---------------------------------------------------------------------------------------------
# the examples in docs/profile.md are real
# ---------------------------------------------------------------------------------------------


def _yaml_blocks(text: str) -> list[str]:
    import re

    return re.findall(r"```yaml\n(.*?)```", text, flags=re.S)


def test_docs_examples_parse(tmp_path):
    import yaml

    docs = Path(__file__).resolve().parents[1] / "docs" / "profile.md"
    variants, profile = _yaml_blocks(docs.read_text(encoding="utf-8"))
    path = tmp_path / "variants.yaml"
    path.write_text(variants)
    specs = resolve_variants(str(path))
    assert [s.name for s in specs] == ["sd-turbo", "sd-v1.5-dpm20", "my-finetune"]
    assert specs[1].scheduler == "dpm++" and specs[0].dtype == "float16"
    parsed = ProfileFile.model_validate(yaml.safe_load(profile))
    assert parsed.model("tiny-turbo").batches[0].median_ms == pytest.approx(47.6)
    assert parsed.model("tiny-turbo").latency_ms(1) == pytest.approx(61.2)  # planning prices the dearer: the edit
    assert not parsed.model("tiny-turbo").batches[-1].feasible


def test_ctrl_c_points_to_resume(tmp_path, monkeypatch):
    import diffserve.profiler

    out = tmp_path / "p.yaml"

    def interrupted(specs, output, settings, progress):
        Path(output).write_text("partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(diffserve.profiler, "profile_variants", interrupted)
    result = _invoke("profile", "-m", "tiny-turbo", "--device", "cpu", "-o", str(out))
    assert result.exit_code == 130
    assert "keeps what was measured" in result.output and "--resume" in result.output


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpu_memory_probe_is_per_batch():
    """In a fresh interpreter: a process that already freed large tensors (the arch tests) keeps
    those pages resident, and a new block may reuse them without moving the high-water mark."""
    import subprocess
    import sys

    script = """
import numpy as np
from diffserve.profiler import MemoryProbe

probe = MemoryProbe("cpu")
probe.reset()
block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
high = probe.peak_mb()
del block
probe.reset()
low = probe.peak_mb()
assert low < high - 150, (low, high)  # the reset forgot the freed block
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
