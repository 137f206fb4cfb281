"""What one ingress costs: the server process's CPU milliseconds per answered image, per output format.

Workers encode the requested ``output_format`` (diffserve/server/imageformat.py); the ingress only
base64-encodes (or stores) the bytes and writes the JSON. This script measures what that leaves:

1. starts ``diffserve serve --backend emulated`` (a light-only SD-Turbo plan on 16 workers, at a
   speedup that makes model time short) as a separate process on loopback; the emulated backend
   answers real-size stand-in images (512x512, ~0.5 MB as PNG) in the requested format;
2. warms each format up (the one-off stand-in encode is the emulated worker's, not per image);
3. reads the server's CPU time (user + system, /proc) over ``--duration`` seconds with no traffic:
   the idle baseline (the controller, timers);
4. per format, sends ``--qps`` requests a second at a fixed rate for ``--duration`` seconds from
   a separate client process, waits for every answer, and reads the server's CPU time again.

Reports per format: total CPU ms per answered image (everything the process spent in the window /
answers), the marginal CPU ms per image (minus the idle baseline over the same wall time), the
response and image sizes, and, for comparison, what re-encoding the PNG in the ingress would
cost per image (the path this replaced: decode + encode in the ingress process). On the embedded
server the "ingress" process also runs the router, batcher and the emulated workers' coroutines,
so its figure is an upper bound on the HTTP part alone. The goal (issue #22): at most 2 ms of
ingress CPU per image, so that one ingress core carries ~470 QPS.

Writes JSON (default bench/results/ingress_cpu.json) and prints a short table. Reusable for any
ingress (the Ray engine's): :func:`measure_ingress_cpu` drives a URL and reads the CPU of the pids
given; :func:`idle_cpu_per_s` measures their baseline.

    python bench/ingress_cpu.py [--qps 50] [--duration 5] [--speedup 20] [--formats png,jpeg] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

PATH = "/v1/images/generations"
MAGIC = {"png": b"\x89PNG", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(pids: Sequence[int]) -> float:
    return sum(process_cpu_s(p) for p in pids)


def idle_cpu_per_s(pids: Sequence[int], duration_s: float) -> float:
    """CPU seconds per wall second that ``pids`` spend with no traffic (their baseline)."""
    c0, t0 = cpu_of(pids), time.perf_counter()
    time.sleep(duration_s)
    return (cpu_of(pids) - c0) / (time.perf_counter() - t0)


# ---------------------------------------------------------------- the client (its own process)


async def _drive(url: str, bodies: list[dict], qps: float, headers: dict[str, str]) -> dict[str, Any]:
    """Send ``bodies`` at a fixed rate (open loop), wait for every answer; statuses and sizes."""
    import aiohttp

    from diffserve.evaluation.loadgen import launch_on_schedule

    statuses: dict[str, int] = {}
    response_bytes: list[int] = []
    image_bytes: list[int] = []
    formats: set[str] = set()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2000), timeout=aiohttp.ClientTimeout(total=120),
                                     headers=headers) as session:
        async def one(i: int) -> None:
            try:
                async with session.post(url, json=bodies[i]) as r:
                    raw = await r.read()
                    status = r.status
            except aiohttp.ClientError:
                status, raw = 0, b""
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 200:
                response_bytes.append(len(raw))
                image = base64.b64decode(json.loads(raw)["data"][0]["b64_json"])
                image_bytes.append(len(image))
                formats.update(f for f, m in MAGIC.items() if image.startswith(m))

        await asyncio.gather(*(session.get(url.replace(PATH, "/healthz")) for _ in range(8)))  # open connections first
        t0 = time.perf_counter()
        tasks, lags = await launch_on_schedule([i / qps for i in range(len(bodies))], one, clock=time.perf_counter)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"statuses": statuses, "answered": statuses.get("200", 0), "client_elapsed_s": elapsed,
            "send_lag_max_ms": 1000 * max(lags, default=0.0), "response_bytes_mean": mean(response_bytes),
            "image_bytes_mean": mean(image_bytes), "image_formats_seen": sorted(formats)}


def _client_main(conn, url: str, bodies: list[dict], qps: float, headers: dict[str, str]) -> None:
    conn.recv()  # go
    conn.send(asyncio.run(_drive(url, bodies, qps, headers)))


def measure_ingress_cpu(
    base_url: str,
    pids: Sequence[int],
    *,
    output_format: str,
    qps: float,
    duration_s: float,
    idle_per_s: float = 0.0,
    output_compression: int | None = None,
    size: str = "512x512",
    extra_body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Drive ``base_url`` with ``qps`` generations a second for ``duration_s`` s, from a separate
    process, and report the CPU that ``pids`` (the ingress processes) spent per answered image.

    ``idle_per_s`` is their baseline (:func:`idle_cpu_per_s`), subtracted over the same wall time
    for the marginal figure. Returns ``cpu_ms_per_image`` (total), ``marginal_cpu_ms_per_image``,
    ``answered``, ``statuses``, sizes, and the window's wall and CPU seconds."""
    body = {"prompt": "", "size": size, "output_format": output_format, **(extra_body or {})}
    if output_compression is not None:
        body["output_compression"] = output_compression
    bodies = [dict(body, prompt=f"ingress cpu {output_format} {i}", seed=i) for i in range(max(1, round(qps * duration_s)))]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    client = ctx.Process(target=_client_main, args=(child, base_url.rstrip("/") + PATH, bodies, qps, headers or {}), daemon=True)
    client.start()
    try:
        c0, t0 = cpu_of(pids), time.perf_counter()
        parent.send("go")
        deadline = time.monotonic() + duration_s + 180
        while not parent.poll(0.2):
            if not client.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the load client {'died' if not client.is_alive() else 'gave no answer within the run + 180 s'}")
        out = parent.recv()
        cpu_s, wall_s = cpu_of(pids) - c0, time.perf_counter() - t0
    finally:
        client.join(10)
        if client.is_alive():
            client.kill()
            client.join()
    answered = max(1, out["answered"])
    return {
        "output_format": output_format, "output_compression": output_compression, "size": size,
        "offered_qps": qps, "duration_s": duration_s, "sent": len(bodies), **out,
        "window_wall_s": wall_s, "cpu_s": cpu_s, "idle_cpu_per_s": idle_per_s,
        "cpu_ms_per_image": 1000 * cpu_s / answered,
        "marginal_cpu_ms_per_image": 1000 * (cpu_s - idle_per_s * wall_s) / answered,
    }


# ---------------------------------------------------------------- the embedded server


def reencode_ms(output_format: str, size: tuple[int, int] = (512, 512), repeat: int = 10) -> float:
    """CPU ms to decode the stand-in PNG and encode it in ``output_format`` (what an ingress that
    re-encodes would pay per image); measured in this process."""
    from PIL import Image

    from diffserve.server.imageformat import ImageFormat, encode_image
    from diffserve.server.standin import make_standin

    png = make_standin("sd-turbo", size, ImageFormat.of("png"))
    fmt = ImageFormat.of(output_format)
    t0 = time.process_time()
    for _ in range(repeat):
        with Image.open(io.BytesIO(png)) as img:
            encode_image(img, fmt)
    return 1000 * (time.process_time() - t0) / repeat


def warm_up(base_url: str, formats: Sequence[str], size: str, attempts: int = 5) -> None:
    """One answer per format, so the emulated worker's one-off stand-in encode is outside the window
    (at a high speedup that encode can outlast a request's deadline: a 504, then the cache answers)."""
    import httpx

    with httpx.Client(timeout=60) as client:
        for fmt in formats:
            for _ in range(attempts):
                r = client.post(base_url.rstrip("/") + PATH, json={"prompt": "warm up", "size": size, "output_format": fmt})
                if r.status_code == 200:
                    break
                time.sleep(1.0)
            r.raise_for_status()


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per format over the repeats: mean, min and max of the per-image figures, and the sizes."""
    out: dict[str, dict[str, Any]] = {}
    for fmt in dict.fromkeys(r["output_format"] for r in runs):
        mine = [r for r in runs if r["output_format"] == fmt]
        row: dict[str, Any] = {"repeats": len(mine), "answered": sum(r["answered"] for r in mine),
                               "response_bytes_mean": mine[0]["response_bytes_mean"], "image_bytes_mean": mine[0]["image_bytes_mean"],
                               "reencode_in_ingress_ms": mine[0].get("reencode_in_ingress_ms")}
        for key in ("cpu_ms_per_image", "marginal_cpu_ms_per_image"):
            values = [r[key] for r in mine]
            row[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
        out[fmt] = row
    return out


def embedded(formats: Sequence[str], qps: float, duration_s: float, speedup: float, size: str, repeats: int = 1) -> dict[str, Any]:
    from server_overhead import ample_plan, start_server, stop_server

    with tempfile.TemporaryDirectory() as tmp:
        info = ample_plan(Path(tmp) / "plan.yaml")
        proc, base = start_server(Path(tmp) / "plan.yaml", 16, speedup)
        try:
            pids = [proc.pid]
            warm_up(base, formats, size)
            idle = idle_cpu_per_s(pids, duration_s)
            runs = [measure_ingress_cpu(base, pids, output_format=f, qps=qps, duration_s=duration_s, idle_per_s=idle, size=size)
                    for _ in range(repeats) for f in formats]  # formats interleaved: a noisy neighbour hits both
        finally:
            rc = stop_server(proc)
    reencode = {f: None if f == "png" else reencode_ms(f) for f in formats}
    for run in runs:
        run["reencode_in_ingress_ms"] = reencode[run["output_format"]]
    return {"engine": "embedded", "backend": "emulated (stand-in pixels)", "speedup": speedup, "plan": info,
            "idle_cpu_per_s": idle, "summary": summarise(runs), "runs": runs, "server_exit_code": rc}


def markdown(result: dict[str, Any]) -> str:
    """The README's table of a run (bench/readme_tables.py renders it from the committed JSON)."""
    m = result["machine"]
    lines = [
        f"Embedded server, emulated backend (stand-in pixels, {result['runs'][0]['size']}), "
        f"{result['runs'][0]['offered_qps']:g} QPS x {result['runs'][0]['duration_s']:g} s per run, "
        f"{result['summary'][next(iter(result['summary']))]['repeats']} runs per format, {m['cpus']} CPUs, "
        f"load average {m['load_average_before'][0]:.2f}; idle baseline {1000 * result['idle_cpu_per_s']:.1f} CPU-ms/s.",
        "",
        "| output format | response | image | ingress CPU per image: total | marginal (minus idle) | re-encoding in the ingress would add (decode + encode) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for fmt, r in result["summary"].items():
        total, marginal = r["cpu_ms_per_image"], r["marginal_cpu_ms_per_image"]
        re = "nothing (PNG passed through)" if r["reencode_in_ingress_ms"] is None else f"{r['reencode_in_ingress_ms']:.1f} ms"
        lines.append(
            f"| {fmt} | {r['response_bytes_mean'] / 1024:.0f} KB | {r['image_bytes_mean'] / 1024:.0f} KB "
            f"| {total['mean']:.2f} ms ({total['min']:.2f}-{total['max']:.2f}) "
            f"| {marginal['mean']:.2f} ms ({marginal['min']:.2f}-{marginal['max']:.2f}) | {re} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qps", type=float, default=50.0, help="requests a second, fixed rate")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per format, and for the idle baseline")
    ap.add_argument("--speedup", type=float, default=20.0, help="model-time speedup of the emulated server")
    ap.add_argument("--formats", default="png,jpeg", help="output formats, comma-separated (png, jpeg, webp)")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--repeats", type=int, default=3, help="runs per format (interleaved); the table gives mean and range")
    ap.add_argument("--output", "--out", dest="out", default=str(REPO / "bench" / "results" / "ingress_cpu.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    load_before = os.getloadavg()
    result = embedded(formats, args.qps, args.duration, args.speedup, args.size, args.repeats)
    result["machine"] = {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg()}
    result["command"] = "python bench/ingress_cpu.py " + " ".join(sys.argv[1:])
    from diffserve.fileio import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"embedded ingress, emulated stand-in images {args.size}, {args.qps:g} QPS x {args.duration:g} s, "
          f"idle {1000 * result['idle_cpu_per_s']:.1f} CPU-ms/s, load average {load_before[0]:.2f}")
    print(f"{'format':<7} {'answered':>8} {'CPU ms/image (range)':>22} {'marginal (range)':>19} {'response KB':>12} "
          f"{'image KB':>9} {'re-encode ms':>13}")
    span = lambda v: f"{v['mean']:.2f} ({v['min']:.2f}-{v['max']:.2f})"  # noqa: E731
    for fmt, r in result["summary"].items():
        re = "-" if r["reencode_in_ingress_ms"] is None else f"{r['reencode_in_ingress_ms']:.1f}"
        print(f"{fmt:<7} {r['answered']:>8} {span(r['cpu_ms_per_image']):>22} {span(r['marginal_cpu_ms_per_image']):>19} "
              f"{(r['response_bytes_mean'] or 0) / 1024:>12.0f} {(r['image_bytes_mean'] or 0) / 1024:>9.0f} {re:>13}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
