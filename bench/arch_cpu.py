"""SDXL and SDXL-Lightning on the CPU: what the suite's one real 64 px step costs (random weights, real architecture).

tests/test_arch_sdxl.py runs one denoising step of each at 64 px, the full pipeline (both text
encoders, UNet, scheduler step, VAE decode), with the two variants sharing their modules
(``diffserve.models.arch.shared_modules``). This script measures the same thing outside pytest:
build time, step time and peak resident memory per variant, in float32 on one torch thread (as
the suite; ``--threads 2`` to compare); with ``--compare-bf16`` also SDXL's CLIP-L text encoder and VAE decode in float32 against
bfloat16 (why the suite runs float32 on CPUs without native bfloat16). The machine's load average
is recorded next to the figures: on a shared machine they mean little without it.

Writes JSON (default bench/results/arch_cpu.json) and prints a short table. Needs about 15 GB free.

    python bench/arch_cpu.py [--threads 1] [--compare-bf16] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffserve.fileio import atomic_write_text  # noqa: E402
from diffserve.models.arch import ARCH_LABEL  # noqa: E402


def _peak_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux -> GiB


def sdxl_steps() -> list[dict[str, Any]]:
    """One 64 px float32 step of each SDXL variant, modules shared, as the suite runs them."""
    from diffserve.models import load_variant
    from diffserve.models.arch import arch_variant, shared_modules

    rows = []
    with shared_modules():
        for name in ("sdxl", "sdxl-lightning"):
            cpu0 = time.process_time()
            model = load_variant(arch_variant(name, resolution=64, steps=1, dtype="float32"), device="cpu")
            start = time.perf_counter()
            images = model.generate(["a red cube on a blue table"], seeds=[0])
            rows.append({"model": name, "build_s": round(model.load_time_s, 1), "step_s": round(time.perf_counter() - start, 1),
                         "cpu_s": round(time.process_time() - cpu0, 1), "peak_rss_gib": _peak_gb(),
                         "image": list(images[0].size), "guidance_scale": model.spec.guidance_scale})
            del model, images
            gc.collect()
    gc.collect()
    return rows


def bf16_comparison() -> list[dict[str, Any]]:
    """SDXL's CLIP-L text encoder and VAE decode (64 px), float32 against bfloat16, second call timed."""
    import torch

    from diffserve.models.arch import POOL_SIZE, _materialise, arch_config

    comps = arch_config("sdxl")["components"]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        pool = torch.randn(POOL_SIZE, generator=torch.Generator().manual_seed(0)).to(dtype)
        for comp in ("text_encoder", "vae"):
            module = _materialise(comps[comp]["class"], comps[comp]["config"], "cpu", dtype, pool)
            if comp == "vae":
                def run(m=module):
                    return m.decode(torch.randn(1, 4, 8, 8, dtype=dtype))
            else:
                def run(m=module):
                    return m(torch.zeros(1, 77, dtype=torch.long))
            with torch.inference_mode():
                run()
                start = time.perf_counter()
                run()
            rows.append({"component": comp, "dtype": str(dtype).removeprefix("torch."), "s": round(time.perf_counter() - start, 2)})
            del module
            gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the suite uses 1)")
    parser.add_argument("--compare-bf16", action="store_true", help="also time CLIP-L and the VAE decode in bfloat16")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "arch_cpu.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict[str, Any] = {"label": ARCH_LABEL, "threads": args.threads, "cpus": os.cpu_count(),
                              "load_average_before": list(os.getloadavg()), "torch": torch.__version__,
                              "steps": sdxl_steps()}
    if args.compare_bf16:
        result["bf16_vs_fp32"] = bf16_comparison()
    result["load_average_after"] = list(os.getloadavg())
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"{ARCH_LABEL}; CPU, {args.threads} threads, load average {result['load_average_before'][0]:.1f} -> "
          f"{result['load_average_after'][0]:.1f}; {result['elapsed_s']} s in all")
    print(f"{'model':<16} {'build s':>8} {'step s':>7} {'cpu s':>7} {'peak RSS GiB':>13}")
    for r in result["steps"]:
        print(f"{r['model']:<16} {r['build_s']:>8} {r['step_s']:>7} {r['cpu_s']:>7} {r['peak_rss_gib']:>13}")
    for r in result.get("bf16_vs_fp32", []):
        print(f"  {r['component']:<14} {r['dtype']:<9} {r['s']:>6} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
