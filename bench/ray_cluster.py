"""The Ray engine on a multi-node cluster: a node lost under load, throughput, a 10x overload.

``--hosts local`` builds the cluster with Ray's own multi-node utility (``ray.cluster_utils.Cluster``):
a head that offers no worker slot and ``--nodes`` worker nodes, each offering ``--slots`` of the
custom resource ``worker_slot`` (standing for GPUs), all on this machine. The emulated backend
replays the paper's A100 profiles, with fractional CPUs per replica.

Scenarios, in one run:

1. ``loss``: the live controller (re-plan every ``--replan-interval`` s) serves Poisson traffic at
   ``--load`` x the plan's capacity; a worker node that does not hold the ingress is removed
   without grace ``--loss-at`` s in. Every request's answer is recorded: ``failed_5xx`` (500s or
   other 5xx that are not the JSON 503/504 refusals), ``duplicates`` (images the server
   completed beyond those the clients received), ``unanswered`` (no HTTP answer within the
   client's timeout). ``replan_after_loss_s`` is the wall time from the removal to the
   controller's capacity re-plan. The node then joins again.
2. ``throughput``: a light-only plan pinned on every slot, offered 1.5x its capacity, through the
   embedded server (same machine, same plan, same workers) and through the cluster. Then, on the
   same plan at 0.8x its capacity, the ingress's CPU ms per answered real-size image (512x512,
   made by the workers) for PNG and JPEG output (``bench/ingress_cpu.py``'s measurement): the
   server process for the embedded server; Serve's HTTP proxy plus the ingress replica for Ray.
3. ``overload``: the same pinned plan offered ``--overload`` x its capacity: refusal latency and
   the admitted requests' latency against SLO + one batch.
4. ``overload_small``: the same, with a plan of one light worker at batch 1 pinned: the same
   factor over a capacity of about 1 request/s of wall time. Through Serve a request costs tens
   of ms of CPU (proxy and ingress) on a small machine, so scenario 3 measures, on 2 cores, how
   fast the machine drains a CPU backlog; this one offers a rate the machine can carry, so it
   measures the refusal path itself.

Ray binds to the machine's address: run inside a loopback-only namespace, like the tests:

    unshare --net sh -c 'ip link set lo up && exec python bench/ray_cluster.py --hosts local'

Writes JSON (default bench/results/ray_cluster_{hosts}.json) and prints a short table.
``--ingresses N`` deploys N ingress replicas (``--ray-ingresses``), kept on the head by a custom
resource so that the lost worker node holds none (default file ``ray_cluster_{hosts}_ingressesN.json``).
``--hosts netns`` runs the same scenarios with each node in its own network namespace, on its
own address on a private bridge (``bench/netns_hosts.py``), inside a parent namespace that the
script creates (it re-runs itself under ``unshare --net --mount``; needs root) and that has no
route out. The head runs ``diffserve serve --engine ray --ray-worker-resource worker_slot``;
clients reach the ingress by the head's address; a node is lost by SIGKILL of every process in
its namespace. Everything is torn down by PID and namespace, also on failure:

    python bench/ray_cluster.py --hosts netns
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingress_cpu import idle_cpu_per_s, measure_ingress_cpu, warm_up  # noqa: E402
from ray_overhead import throughput  # noqa: E402
from server_overhead import start_server, stop_server, write_plan  # noqa: E402

SLOT = "worker_slot"
#: what the head offers so that several ingress replicas run there, off the worker nodes a loss takes
INGRESS_SLOT = "ingress_slot"
SLO_S = 5.0  # model seconds
#: Ray's GCS declares a node dead after this many missed health checks this far apart (Ray
#: 2.60's defaults are slower); the re-plan after a loss can only follow that detection
HEALTH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
#: Ray 2.60 turns token authentication on for a head on a non-loopback address, with the token in
#: ~/.ray/auth_token, a file every Ray user of this machine shares; the hosts here sit on a
#: private bridge with no route out, so it is off rather than racing other users for that file
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def proxy_pids() -> list[int]:
    """Serve's HTTP proxies on this machine (``ray::ProxyActor``): the other half of the Ray ingress."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::ProxyActor"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class LocalCluster:
    """``--hosts local``: Ray's ``Cluster`` utility, every node on 127.0.0.1; this process is the driver."""

    def __init__(self, args, workers_total: int, opts_kw: dict) -> None:
        self.args, self.workers_total, self.opts_kw = args, workers_total, opts_kw
        self.headers: dict[str, str] = {}

    def start(self) -> str:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        from diffserve.ports import free_port
        from diffserve.ray_engine import RayOptions, deploy
        from diffserve.server.build import ServeOptions

        self.cluster = Cluster()
        self.cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False, _system_config=HEALTH,
                              resources={INGRESS_SLOT: self.args.ingresses})
        self.workers = [self._add() for _ in range(self.args.nodes)]
        ray.init(address=self.cluster.address, log_to_driver=False)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()})
        deployed = deploy(ServeOptions(backend="emulated", workers=self.workers_total, **self.opts_kw),
                          RayOptions(worker_resource=SLOT, num_cpus=0.05, ingress_num_cpus=0.05, ingress_replicas=self.args.ingresses,
                                     ingress_resource=INGRESS_SLOT if self.args.ingresses > 1 else None), port=0)
        return deployed.url

    def _add(self):
        return self.cluster.add_node(num_cpus=1, resources={SLOT: self.args.slots}, node_ip_address="127.0.0.1")

    def remove_one(self, ingress_node_id: str, ingress_ip: str) -> str:
        victim = next(n for n in self.workers if n.node_id != ingress_node_id)
        self.cluster.remove_node(victim, allow_graceful=False)
        self.workers.remove(victim)
        return victim.node_id

    def rejoin(self) -> None:
        self.workers.append(self._add())

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            if hasattr(self, "cluster"):
                self.cluster.shutdown()


class NetnsCluster:
    """``--hosts netns``: host ``h0`` (10.77.0.1) is the head and runs ``diffserve serve --engine
    ray`` itself; hosts ``h1..`` are worker nodes (``ray start --resources``). This process, in
    the parent namespace, only talks HTTP to the head's address. A node is lost by SIGKILL of
    every process in its namespace."""

    PORT = 8000
    TOKEN = "bench-token"

    def __init__(self, args, workers_total: int, opts_kw: dict) -> None:
        from netns_hosts import Hosts

        self.args, self.workers_total, self.opts_kw = args, workers_total, opts_kw
        self.hosts = Hosts(1 + args.nodes)
        self.headers = {"Authorization": f"Bearer {self.TOKEN}"}
        self.logs = Path(tempfile.mkdtemp(prefix="ray-netns-"))

    def _ray(self, i: int, *argv: str):
        log = open(self.logs / f"h{i}.log", "ab")
        env = {**os.environ, **RAY_ENV}
        return self.hosts.run(i, [str(Path(sys.executable).parent / "ray"), *argv], stdout=log, stderr=log, env=env)

    def _node(self, i: int, *argv: str, attempts: int = 3) -> None:
        """``ray start --block`` in host ``i`` until it says the node runs. Ray waits a fixed 30 s
        for a raylet to register; on a busy host a start can miss it: kill the host, try again."""
        log = self.logs / f"h{i}.log"
        for attempt in range(1, attempts + 1):
            offset = log.stat().st_size if log.exists() else 0
            proc = self._ray(i, "start", "--block", *argv)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                if "Ray runtime started" in log.read_bytes()[offset:].decode(errors="ignore"):
                    return
                time.sleep(0.5)
            self.hosts.kill_host(i)
            print(f"host h{i}: ray start failed (attempt {attempt}, log {log})", file=sys.stderr)
        raise RuntimeError(f"could not start a Ray node in host h{i}; see {log}")

    def _worker(self, i: int) -> None:
        self._node(i, f"--address={self.hosts.address(0)}:6379", f"--node-ip-address={self.hosts.address(i)}",
                   "--num-cpus=1", f"--resources={json.dumps({SLOT: self.args.slots})}", "--disable-usage-stats")

    def start(self) -> str:
        self.hosts.__enter__()
        head = self.hosts.address(0)
        self._node(0, "--head", "--port=6379", f"--node-ip-address={head}", "--num-cpus=1",
                   f"--resources={json.dumps({INGRESS_SLOT: self.args.ingresses})}",
                   "--include-dashboard=false", "--disable-usage-stats", f"--system-config={json.dumps(HEALTH)}")
        for i in range(1, 1 + self.args.nodes):
            self._worker(i)
        k = self.opts_kw
        argv = [sys.executable, "-m", "diffserve.cli.main", "serve", "--engine", "ray", "--address", f"{head}:6379",
                "--ray-worker-resource", SLOT, "--ray-num-cpus", "0.05", "--host", "0.0.0.0", "--port", str(self.PORT),
                "--admin-token", self.TOKEN, "--backend", "emulated", "--speedup", str(k["speedup"]),
                "--demand", str(k["demand_qps"]), "--replan-interval", f"{k['replan_interval_ms']:.0f}ms",
                "--slo", f"{k['slo_ms']:.0f}ms", "--max-queue", str(k["max_queue"])]
        if self.args.ingresses > 1:
            argv += ["--ray-ingresses", str(self.args.ingresses), "--ray-ingress-resource", INGRESS_SLOT]
        log = open(self.logs / "serve.log", "ab")
        self.hosts.run(0, argv, stdout=log, stderr=log, cwd=REPO, env={**os.environ, **RAY_ENV})
        base = f"http://{head}:{self.PORT}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, f"the ingress at {base} (logs: {self.logs})", 300)
        return base

    def remove_one(self, ingress_node_id: str, ingress_ip: str) -> str:
        i = next(i for i in range(1, self.hosts.n) if self.hosts.address(i) != ingress_ip and self.hosts.pids(i))
        self.hosts.kill_host(i)
        self.lost = i
        return self.hosts.address(i)

    def rejoin(self) -> None:
        self._worker(self.lost)

    def close(self) -> None:
        self.hosts.close()


HEADERS: dict[str, str] = {}  # the admin token, where the ingress has one
#: the ingress CPU is measured at this share of the pinned plan's capacity (every request answered)
INGRESS_LOAD = 0.8


#: ingress replicas of the Ray app (``--ingresses``); each answers /v1/plan and /v1/ray for itself
INGRESSES = 1


def by_rank(base: str, path: str, n: int | None = None) -> dict[int, dict]:
    """``path`` as every one of the ``n`` (default ``--ingresses``) ingress replicas answers it
    (Serve's proxy picks one per request): asked until each rank has answered once."""
    n = INGRESSES if n is None else n
    seen: dict[int, dict] = {}

    def every_rank() -> bool:
        view = httpx.get(f"{base}{path}", headers=HEADERS, timeout=30).json()
        seen[(view.get("ingress") or {}).get("rank", 0)] = view
        return len(seen) >= n

    wait_for(every_rank, f"all {n} ingress replicas answering {path}", 60)
    return seen


def plan_view(base: str) -> dict:
    """The leader's view (its controller's decisions), with every replica's ledger summed."""
    views = by_rank(base, "/v1/plan")
    out = dict(views[0])
    out["ledger"] = {k: sum(v["ledger"][k] for v in views.values()) for k in views[0]["ledger"]}
    return out


def ray_view(base: str) -> dict:
    """The leader's view, with every ingress replica's pid (``ingress_pids``)."""
    views = by_rank(base, "/v1/ray")
    return {**views[0], "ingress_pids": [v["ingress_pid"] for v in views.values()]}


def wait_for(predicate, what: str, timeout_s: float = 180.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (httpx.TransportError, ValueError, KeyError):  # the ingress is busy or restarting
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def replicas_total(base: str) -> int:
    return sum(sum(m.values()) for m in ray_view(base)["replicas_per_node"].values())


def outcome(recs: list[dict], completed_delta: int) -> dict:
    """The counts of the issue's JSON from client records and the server's ledger delta."""
    answered = sum(r["status"] == 200 for r in recs)
    refused = sum(r["status"] in (429, 503, 504) and r.get("json_error", True) for r in recs)
    failed = sum(r["status"] >= 500 and not (r["status"] in (503, 504) and r.get("json_error", True)) for r in recs)
    unanswered = sum(r["status"] == 0 for r in recs)
    return {"sent": len(recs), "answered": answered, "refused": refused, "failed_5xx": failed,
            "duplicates": max(0, completed_delta - answered), "unanswered": unanswered}


async def records_with_errors(base: str, qps: float, duration: float, speedup: float, seed: int, timeout_s: float | None = None) -> list[dict]:
    """Open-loop Poisson arrivals like ``server_overhead.open_loop``, but every answer is kept:
    a body that is not a JSON error is marked (``json_error`` False), and a request with no HTTP
    answer within ``timeout_s`` (reset, timeout) is recorded with status 0 (unanswered)."""
    import random

    import aiohttp

    from diffserve.evaluation.loadgen import launch_on_schedule, poisson_offsets_s

    records: list[dict] = []
    url = f"{base}/v1/images/generations"
    timeout_s = timeout_s or max(60.0, 3 * SLO_S / speedup)  # far past any admitted request's deadline
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4000),
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async def one(i: int) -> None:
            sent = time.perf_counter()
            rec: dict = {"status": 0, "sent": sent, "seed": seed * 1_000_000 + i}
            try:
                async with session.post(url, json={"prompt": f"prompt {i}", "seed": rec["seed"]}) as r:
                    rec["status"] = r.status
                    raw = await r.read()
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                rec["json_error"] = r.status == 200 or (isinstance(body, dict) and "error" in body)
                if r.status == 200 and body:
                    meta = body["data"][0]["diffserve"]
                    rec.update(model=meta["model"], compute_wall_ms=meta["compute_ms"] / speedup)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                rec["error"] = repr(exc)
            rec["done"] = time.perf_counter()
            rec["wall_ms"] = (rec["done"] - sent) * 1000
            records.append(rec)

        tasks, _ = await launch_on_schedule(poisson_offsets_s(qps, duration, random.Random(seed)), one, clock=time.perf_counter)
        await asyncio.gather(*tasks)
    return records


def loss_scenario(args, cluster, base: str, capacity_wall: float) -> dict:
    wait_for(lambda: replicas_total(base) == args.nodes * args.slots, "every replica running")
    view_ray = ray_view(base)
    before = view_ray["replicas_per_node"]
    view = plan_view(base)
    n_decisions, completed0 = len(view["decisions"]), view["ledger"]["requests_completed"]
    out: dict = {}

    def remove() -> None:
        time.sleep(args.loss_at)
        out["lost_node"] = cluster.remove_one(view_ray["ingress_node_id"], view_ray["ingress_node_ip"])
        t_loss = time.monotonic()
        d = wait_for(lambda: next((d for d in plan_view(base)["decisions"][n_decisions:]
                                   if d["reason"].startswith("re-plan: the cluster has")), None), "the capacity re-plan")
        out["replan_after_loss_s"] = time.monotonic() - t_loss
        out["replan"] = {"workers": d["workers"], "reason": d["reason"]}

    killer = threading.Thread(target=remove)
    killer.start()
    recs = asyncio.run(records_with_errors(base, capacity_wall * args.load, args.duration, args.speedup, seed=args.seed))
    killer.join()
    wait_for(lambda: replicas_total(base) == (args.nodes - 1) * args.slots, "the replicas of the surviving nodes")
    time.sleep(1.0)
    view = plan_view(base)
    out.update(outcome(recs, view["ledger"]["requests_completed"] - completed0))
    out["statuses"] = {str(st): sum(r["status"] == st for r in recs) for st in sorted({r["status"] for r in recs})}
    out["inflight_after"] = view["ledger"]["requests_accepted"] - view["ledger"]["requests_completed"] - view["ledger"]["requests_failed"] - view["ledger"]["requests_cancelled"]
    out["replicas_per_node_before"] = before
    out["replicas_per_node_after"] = ray_view(base)["replicas_per_node"]
    out["readyz_after"] = httpx.get(f"{base}/readyz", timeout=30).json()
    known = set(ray_view(base)["replicas_per_node"])
    cluster.rejoin()
    out["rejoined_node_used"] = bool(wait_for(lambda: set(ray_view(base)["replicas_per_node"]) - known, "the rejoined node's replicas"))
    return out


def pin_plan(base: str, plan_path: Path, ray: bool = False) -> None:
    """Pin ``plan_path``; on Ray, return once the plan's replicas run (a replica start is not load)."""
    import yaml

    plan = yaml.safe_load(plan_path.read_text())
    httpx.put(f"{base}/v1/plan", json=plan, headers=HEADERS, timeout=30).raise_for_status()
    if ray:
        want = {p["model"]: p["workers"] for p in plan["pools"]}

        def running() -> bool:
            have: dict[str, int] = {}
            for models in ray_view(base)["replicas_per_node"].values():
                for m, n in models.items():
                    have[m] = have.get(m, 0) + n
            return {m: have.get(m, 0) for m in want} == want and sum(have.values()) == sum(want.values())

        wait_for(running, "the pinned plan's replicas", 300)
    time.sleep(2.0)


def pinned_load(base: str, plan_path: Path, qps: float, duration: float, speedup: float, seed: int, ray: bool = False) -> list[dict]:
    """Pin ``plan_path``, offer ``qps`` (wall) for ``duration``; returns the client records."""
    pin_plan(base, plan_path, ray)
    return asyncio.run(records_with_errors(base, qps, duration, speedup, seed))


INGRESS_FORMATS = ("png", "jpeg")


def ingress_cpu(base: str, pids: list[int], qps: float, duration: float) -> dict:
    """CPU ms per answered real-size image of the ingress processes ``pids``, per output format, at
    ``qps`` (below the pinned plan's capacity, so that every request is answered): the total and
    the marginal (minus the processes' idle baseline over the same wall time)."""
    warm_up(base, INGRESS_FORMATS, "512x512")
    idle = idle_cpu_per_s(pids, 5.0)
    out: dict = {"idle_cpu_per_s": idle, "offered_qps": qps}
    for fmt in INGRESS_FORMATS:
        m = measure_ingress_cpu(base, pids, output_format=fmt, qps=qps, duration_s=duration, idle_per_s=idle, headers=HEADERS)
        out[fmt] = {k: m[k] for k in ("cpu_ms_per_image", "marginal_cpu_ms_per_image", "answered", "statuses",
                                      "response_bytes_mean", "image_bytes_mean")}
    return out


def small_plan(path: Path) -> dict:
    """One light worker at batch 1 (``overload_small``): its capacity in model-time QPS."""
    from diffserve.fileio import write_model
    from diffserve.reference import reference_profile
    from diffserve.schemas import PlanFile, PoolPlan

    latency = reference_profile().model("sd-turbo").latency_ms(1)
    capacity = 1000.0 / latency
    plan = PlanFile(policy="hand-built", routing="light-only", light="sd-turbo", heavy=None, threshold=None,
                    pools=[PoolPlan(model="sd-turbo", workers=1, batch_size=1, capacity_qps=capacity, latency_ms=latency)],
                    demand_qps=capacity, slo_ms=SLO_S * 1000, workers_available=1)
    write_model(path, plan)
    return {"routing": plan.routing, "pools": [p.model_dump() for p in plan.pools], "capacity_qps": capacity,
            "batch_s": latency / 1000}


def overload_small(base: str, plan_path: Path, info: dict, args, ray: bool = False) -> dict:
    """``overload_small``: the small plan pinned, ``--overload`` x its capacity for 2 x ``--sat-duration``."""
    pin_plan(base, plan_path, ray)
    qps = info["capacity_qps"] * args.speedup * args.overload
    recs = asyncio.run(records_with_errors(base, qps, 2 * args.sat_duration, args.speedup, args.seed + 2))
    return refusal_stats(recs, SLO_S / args.speedup, info["batch_s"] / args.speedup)


def refusal_stats(recs: list[dict], slo_s: float, batch_s: float) -> dict:
    from diffserve.evaluation.loadgen import answer_summary

    return {**answer_summary(recs), "slo_plus_batch_ms": (slo_s + batch_s) * 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", choices=["local", "netns"], default="local")
    ap.add_argument("--nodes", type=int, default=2, help="worker nodes (the head offers no worker slot)")
    ap.add_argument("--slots", type=int, default=2, help="worker_slot per worker node")
    ap.add_argument("--speedup", type=float, default=0.1, help="model time / wall time; below 1 so that 2 cores can drive 10x overload")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of the loss scenario")
    ap.add_argument("--sat-duration", type=float, default=12.0, help="seconds of each throughput and overload run")
    ap.add_argument("--load", type=float, default=0.6, help="offered load of the loss scenario, x the plan's capacity")
    ap.add_argument("--loss-at", type=float, default=6.0, help="seconds into the loss scenario the node is removed")
    ap.add_argument("--overload", type=float, default=10.0)
    ap.add_argument("--replan-interval", type=float, default=10.0, help="seconds between periodic re-plans")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ingresses", type=int, default=1,
                    help="Ray ingress replicas (--ray-ingresses); more than one are placed on the head (a custom resource)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    global INGRESSES
    INGRESSES = args.ingresses
    if args.hosts == "netns":
        from netns_hosts import enter_parent_namespace

        enter_parent_namespace()  # re-runs this script in a namespace with no route out
    # Ray's files (sessions, and the ray_current_cluster address file that a later ray.init() on
    # this machine would join) go to a directory of this run, not the /tmp/ray every Ray user shares
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-bench-")
    suffix = f"_ingresses{args.ingresses}" if args.ingresses > 1 else ""
    out_path = args.out or str(REPO / "bench" / "results" / f"ray_cluster_{args.hosts}{suffix}.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    workers_total = args.nodes * args.slots
    slo_s = SLO_S
    with tempfile.TemporaryDirectory() as tmp:
        sat_path = Path(tmp) / "sat.yaml"
        sat_info = write_plan(sat_path, "clipper-light", 50, workers_total)
        small_path = Path(tmp) / "small.yaml"
        small_info = small_plan(small_path)
        cap = sum(p["capacity_qps"] for p in sat_info["pools"]) * args.speedup
        batch = sat_info["pools"][0]["batch_size"]
        from diffserve.reference import reference_profile

        batch_s = reference_profile().model(sat_info["pools"][0]["model"]).latency_ms(batch) / 1000 / args.speedup

        # the embedded server first, alone on the machine (on loopback)
        proc, base = start_server(sat_path, workers_total, args.speedup)
        try:
            recs = pinned_load(base, sat_path, cap * 1.5, args.sat_duration, args.speedup, args.seed)
            embedded = throughput(recs, args.sat_duration, cap)
            embedded_cpu = ingress_cpu(base, [proc.pid], cap * INGRESS_LOAD, args.sat_duration)
            embedded_overload = refusal_stats(asyncio.run(records_with_errors(
                base, cap * args.overload, args.sat_duration / 2, args.speedup, args.seed + 1)), slo_s / args.speedup, batch_s)
            embedded_small = overload_small(base, small_path, small_info, args)
        finally:
            stop_server(proc)

        # the loss scenario's plan is the live controller's, for a demand below the cluster's capacity
        live_demand = cap / args.speedup * args.load
        opts_kw = dict(speedup=args.speedup, demand_qps=live_demand, replan_interval_ms=args.replan_interval * 1000 * args.speedup,
                       slo_ms=slo_s * 1000, max_queue=512)
        cluster = (NetnsCluster if args.hosts == "netns" else LocalCluster)(args, workers_total, opts_kw)
        HEADERS.update(cluster.headers)
        t0 = time.perf_counter()
        try:
            base = cluster.start()
            startup = time.perf_counter() - t0
            loss = loss_scenario(args, cluster, base, live_demand * args.speedup)
            wait_for(lambda: replicas_total(base) == workers_total, "every replica running after the rejoin")
            pids = ray_view(base)["ingress_pids"]
            # network namespaces share one PID namespace: the ingress's /proc entry reads from here
            recs = pinned_load(base, sat_path, cap * 1.5, args.sat_duration, args.speedup, args.seed, ray=True)
            ray_sat = throughput(recs, args.sat_duration, cap)
            ray_cpu = ingress_cpu(base, [*pids, *proxy_pids()], cap * INGRESS_LOAD, args.sat_duration)
            ray_overload = refusal_stats(asyncio.run(records_with_errors(
                base, cap * args.overload, args.sat_duration / 2, args.speedup, args.seed + 1)), slo_s / args.speedup, batch_s)
            ray_small = overload_small(base, small_path, small_info, args, ray=True)
        finally:
            cluster.close()

    results = {
        "hosts": args.hosts, "nodes": 1 + args.nodes, "workers": workers_total, "ingress_replicas": args.ingresses,
        **{k: loss.get(k) for k in ("sent", "answered", "refused", "failed_5xx", "duplicates", "unanswered",
                                    "replicas_per_node_before", "replicas_per_node_after", "replan_after_loss_s")},
        "throughput_rps": ray_sat["achieved_qps"], "embedded_throughput_rps": embedded["achieved_qps"],
        "throughput_ratio": ray_sat["achieved_qps"] / max(embedded["achieved_qps"], 1e-9),
        "ingress_cpu_ms_per_image": {
            "embedded": {f: embedded_cpu[f]["cpu_ms_per_image"] for f in INGRESS_FORMATS},
            "ray": {f: ray_cpu[f]["cpu_ms_per_image"] for f in INGRESS_FORMATS},
            "processes": {"embedded": "the server process (HTTP, router, batcher, emulated workers)",
                          "ray": "Serve's HTTP proxy + the ingress replicas (HTTP, router, batcher); the pool replicas run the models"},
            "payload": "emulated stand-in pixels at the real size, 512x512, encoded by the worker",
            "details": {"embedded": embedded_cpu, "ray": ray_cpu},
        },
        "overload": {"factor": args.overload, "embedded": embedded_overload, "ray": ray_overload},
        "overload_small": {"factor": args.overload, "plan": small_info, "embedded": embedded_small, "ray": ray_small},
        "loss": loss, "startup_s": startup, "settings": vars(args), "plan": sat_info, "machine": {"cpus": os.cpu_count()},
        "models": "emulated (the paper's A100 profiles replayed)",
    }
    from diffserve.fileio import atomic_write_text

    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, json.dumps(results, indent=2, default=str))
    print(f"{'hosts':<6} {'sent':>5} {'ok':>5} {'refused':>7} {'5xx':>4} {'dup':>4} {'lost':>4} {'replan s':>8} "
          f"{'ray rps':>8} {'emb rps':>8} {'ratio':>6}")
    print(f"{args.hosts:<6} {results['sent']:>5} {results['answered']:>5} {results['refused']:>7} {results['failed_5xx']:>4} "
          f"{results['duplicates']:>4} {results['unanswered']:>4} {results['replan_after_loss_s']:>8.1f} "
          f"{results['throughput_rps']:>8.1f} {results['embedded_throughput_rps']:>8.1f} {results['throughput_ratio']:>6.0%}")
    cpu = results["ingress_cpu_ms_per_image"]
    print("ingress CPU ms per image: " + ", ".join(f"{e} {f} {cpu[e][f]:.1f}" for e in ("embedded", "ray") for f in INGRESS_FORMATS))
    for scenario, name, o in (("overload", "embedded", embedded_overload), ("overload", "ray", ray_overload),
                              ("overload_small", "embedded", embedded_small), ("overload_small", "ray", ray_small)):
        print(f"{scenario} {args.overload:g}x, {name}: refusals p99 {_ms(o['refused_ms_p99'])}, admitted p99 "
              f"{_ms(o['admitted_ms_p99'])} (SLO + one batch = {o['slo_plus_batch_ms']:.0f} ms)")
    print(f"Wrote {out_path}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


if __name__ == "__main__":
    main()
