"""The Ray engine on a multi-node cluster: placement across nodes, a node lost under load, a rejoin.

Ray's own multi-node test utility (``ray.cluster_utils.Cluster``) starts a head and two worker
nodes on this machine, each worker offering 2 ``worker_slot`` (standing for GPUs); the head
offers none, so pool replicas run only on the worker nodes. Like ``tests/test_ray_engine.py``
these run only in a network namespace that has only loopback (CI:
``unshare --net sh -c 'ip link set lo up && exec python -m pytest -m ray'``); they carry both
the ``ray`` and the ``ray_cluster`` marker, so ``-m ray_cluster`` selects them alone.

The controller's periodic re-plan is an hour apart here: the only re-plan that can follow a
node's loss inside that interval is the one the loss itself triggers.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections import Counter

import pytest

import ray_helpers
from ray_helpers import NEEDS_LOOPBACK_ONLY

pytestmark = [pytest.mark.ray, pytest.mark.ray_cluster, NEEDS_LOOPBACK_ONLY]

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
import httpx  # noqa: E402

WAIT_S = 120.0
SLOT = "worker_slot"
NODE = {"num_cpus": 1, "resources": {SLOT: 2}, "node_ip_address": "127.0.0.1"}

wait_for = functools.partial(ray_helpers.wait_for, timeout_s=WAIT_S, poll_s=0.5)


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from ray import serve
    from ray.cluster_utils import Cluster

    for attempt in range(1, 4):
        # Ray waits a fixed 30 s for a raylet to register; on a busy 2-core host a start can miss
        # that, which says nothing about diffserve: clean retries
        c = Cluster()
        try:
            c.add_node(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False)  # the head
            workers = [c.add_node(**NODE) for _ in range(2)]
            break
        except Exception:
            c.shutdown()
            if attempt == 3:
                raise
    ray.init(address=c.address, log_to_driver=False)
    # one proxy, on the head: every node of this cluster has the same address
    ray_helpers.start_serve(proxy_location="HeadOnly")
    try:
        yield c, workers
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()  # also deletes /tmp/ray/ray_current_cluster, which a later ray.init() would join


@pytest.fixture(scope="module")
def engine(cluster):
    from diffserve.server.build import ServeOptions

    from diffserve.ray_engine import RayOptions, deploy

    opts = ServeOptions(backend="emulated", workers=1, speedup=1.0, demand_qps=2.0, replan_interval_ms=3.6e6, slo_ms=20_000)
    ray_opts = RayOptions(worker_resource=SLOT, num_cpus=0.05, ingress_num_cpus=0.05)
    deployed = deploy(opts, ray_opts, port=0)
    client = httpx.Client(base_url=deployed.url, timeout=WAIT_S)
    wait_for(lambda: client.get("/readyz").status_code == 200, "readyz")
    yield deployed, client
    client.close()


def ray_status(client) -> dict:
    r = client.get("/v1/ray")
    assert r.status_code == 200, r.text
    return r.json()


def placed(client, total: int):
    """The per-node replica counts once ``total`` replicas run, else None."""
    s = ray_status(client)
    per_node = s["replicas_per_node"]
    return per_node if sum(sum(m.values()) for m in per_node.values()) == total else None


def worker_node_ids(nodes) -> set[str]:
    return {n.node_id for n in nodes}


def test_plan_uses_the_cluster_slots_and_replicas_spread_over_the_worker_nodes(cluster, engine):
    c, workers = cluster
    deployed, client = engine
    plan = client.get("/v1/plan").json()["plan"]
    assert sum(p["workers"] for p in plan["pools"]) == 4  # --workers 1 was replaced by 2 nodes x 2 slots
    per_node = wait_for(lambda: placed(client, 4), "4 running replicas")
    assert set(per_node) == worker_node_ids(workers)  # none on the head, both workers used
    assert ray_status(client)["worker_slots"] == 4
    r = client.post("/v1/images/generations", json={"prompt": "a lighthouse", "seed": 1})
    assert r.status_code == 200, r.text


def test_a_node_lost_under_load_every_request_answered_once_replan_and_rejoin(cluster, engine):
    c, workers = cluster
    deployed, client = engine
    wait_for(lambda: placed(client, 4), "4 running replicas")
    ingress_node = next(r.node_id for r in _replicas(deployed, "Ingress"))
    victim = next(n for n in workers if n.node_id != ingress_node)  # the ingress must survive
    before = client.get("/v1/plan").json()
    decisions_before = len(before["decisions"])
    ledger_before = before["ledger"]

    results: list[tuple[int, dict | None]] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    seeds = itertools.count(1000)
    lock = threading.Lock()

    def load() -> None:
        with httpx.Client(base_url=deployed.url, timeout=WAIT_S) as cl:
            while not stop.is_set():
                with lock:
                    seed = next(seeds)
                try:
                    r = cl.post("/v1/images/generations", json={"prompt": f"boat {seed}", "seed": seed})
                except BaseException as exc:  # noqa: BLE001 - a hang or reset is a finding, not a crash
                    errors.append(exc)
                    continue
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
                with lock:
                    results.append((r.status_code, body))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 8, "traffic before the loss")
        c.remove_node(victim, allow_graceful=False)  # SIGKILL-like: its raylet and replicas die
        replan = wait_for(lambda: _capacity_replan(client, decisions_before), "the re-plan after the loss")
        wait_for(lambda: placed(client, 2), "2 running replicas after the loss")
        n_after = len(results)
        wait_for(lambda: len(results) >= n_after + 8, "traffic after the re-plan")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=WAIT_S)
    assert not any(t.is_alive() for t in threads), "a client is still waiting: a request hangs"
    assert errors == [], f"requests with no HTTP answer: {errors[:3]}"
    statuses = Counter(s for s, _ in results)
    assert statuses[200] > 0
    assert set(statuses) <= {200, 429, 503, 504}, (statuses, [b for s, b in results if s not in (200, 429, 503, 504)][:3])  # no 500
    for status, body in results:
        if status != 200:
            assert body is not None and body["error"]["message"], (status, body)  # a clear JSON error
    # each request answered exactly once: the ledger counts what the clients saw, nothing in flight
    after = client.get("/v1/plan").json()
    ledger = after["ledger"]
    completed = ledger["requests_completed"] - ledger_before["requests_completed"]
    refusals = Counter((s, b["error"]["message"][:60]) for s, b in results if s != 200 and b)
    assert completed == statuses[200], (statuses, ledger, ledger_before, refusals.most_common(5))
    assert ledger["requests_accepted"] - (ledger["requests_completed"] + ledger["requests_failed"] + ledger["requests_cancelled"]) == 0
    # the re-plan is for the 2 slots that remain, and every surviving node runs replicas
    assert sum(replan["workers"].values()) == 2 and replan["applied"], (replan, after["decisions"][decisions_before:])
    survivors = worker_node_ids(workers) - {victim.node_id}
    wait_for(lambda: set(ray_status(client)["replicas_per_node"]) == survivors, f"replicas on the surviving node {survivors}")
    # the slots lost with the node, once the re-plan's replicas run on the survivor (until then a
    # planned worker whose replica is still starting counts as down too)
    wait_for(lambda: client.get("/readyz").json()["workers_down"] == 2, "/readyz: the 2 slots lost with the node down")
    metrics = client.get("/metrics").text
    assert "diffserve_ray_worker_slots 2.0" in metrics

    # a node that joins again is used again
    back = c.add_node(**NODE)
    wait_for(lambda: _capacity_replan(client, len(after["decisions"])), "the re-plan after the rejoin")
    per_node = wait_for(lambda: placed(client, 4), "4 running replicas after the rejoin")
    assert back.node_id in per_node
    assert client.get("/readyz").json()["workers_down"] == 0
    r = client.post("/v1/images/generations", json={"prompt": "a lighthouse", "seed": 2})
    assert r.status_code == 200, r.text


def _replicas(deployed, deployment: str):
    from diffserve.ray_engine import scaler

    return [r for r in scaler.replicas(deployed.app_name, deployment) if r.state == "RUNNING"]


def _capacity_replan(client, since: int):
    """The first decision after ``since`` that the cluster's capacity forced, else None."""
    decisions = client.get("/v1/plan").json()["decisions"][since:]
    return next((d for d in decisions if d["reason"].startswith("re-plan: the cluster has")), None)
