"""The Ray Serve engine end to end, inside a network namespace that has only loopback.

Ray binds to the machine's address, so these tests run only where ``socket.if_nameindex()``
lists nothing but ``lo``: CI runs them with
``unshare --net sh -c 'ip link set lo up && exec python -m pytest -m ray'``.
One Ray instance and one deployment serve the whole module (a start costs 10-30 s on 2 cores).
"""

from __future__ import annotations

import base64
import functools
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import ray_helpers
from ray_helpers import NEEDS_LOOPBACK_ONLY

pytestmark = [pytest.mark.ray, NEEDS_LOOPBACK_ONLY]

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
import httpx  # noqa: E402

#: Bounds on every wait in this module (wall seconds): nothing here may hang.
WAIT_S = 60.0

wait_for = functools.partial(ray_helpers.wait_for, timeout_s=WAIT_S, poll_s=0.2)


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray_helpers.start_serve()
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def engine(cluster):
    """The emulated reference cascade at speedup 2 on 3 workers; the controller re-plans rarely
    so that the tests decide when the plan changes (through PUT /v1/plan, the same apply path)."""
    from diffserve.server.build import ServeOptions

    from diffserve.ray_engine import RayOptions, deploy

    # a 60 s SLO: no deadline here may depend on how fast Ray notices a dead replica on a busy host
    opts = ServeOptions(backend="emulated", workers=3, speedup=2.0, demand_qps=1.0, replan_interval_ms=3.6e6, slo_ms=60_000)
    deployed = deploy(opts, RayOptions(), port=0)
    client = httpx.Client(base_url=deployed.url, timeout=WAIT_S)
    wait_for(lambda: client.get("/readyz").status_code == 200, "readyz")
    yield deployed, client
    client.close()


def running(deployed, model: str):
    from diffserve.ray_engine import scaler

    return [r for r in scaler.replicas(deployed.app_name, deployed.deployments[model]) if r.state == "RUNNING"]


def generate(client, **body):
    body.setdefault("prompt", "a lighthouse at dusk")
    return client.post("/v1/images/generations", json=body)


def test_request_end_to_end(engine):
    deployed, client = engine
    r = generate(client, seed=3)
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    assert base64.b64decode(item["b64_json"]).startswith(b"\x89PNG")
    meta = item["diffserve"]
    assert meta["model"] in ("sd-turbo", "sd-v1.5")
    assert meta["confidence"] is not None  # the light replica ran the discriminator
    assert meta["compute_ms"] >= 100.0  # at least SD-Turbo's batch-1 latency, in model time
    plan = client.get("/v1/plan").json()
    assert plan["decisions"][0]["reason"].startswith("initial plan")
    bad = client.post("/v1/images/generations", json={"prompt": "x", "n": "two"})
    assert bad.status_code in (400, 422) and bad.json()["error"]["param"] in ("n", None)


def test_the_replica_makes_the_requested_format_at_the_real_size(engine):
    """The pool replica encodes the JPEG (emulated stand-in pixels, 512x512); the ingress only passes it on."""
    import io

    from PIL import Image

    deployed, client = engine
    r = generate(client, seed=5, size="512x512", output_format="jpeg", output_compression=80)
    assert r.status_code == 200, r.text
    assert r.json()["output_format"] == "jpeg"
    img = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert (img.format, img.size) == ("JPEG", (512, 512))


def test_an_edit_runs_on_the_replicas_as_an_edit(engine):
    """POST /v1/images/edits through Serve's proxy and the Ray ingress: answered by the light
    replica (the engine refused edits while its calls carried no input image)."""
    import io

    from PIL import Image

    deployed, client = engine
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="PNG")
    r = client.post("/v1/images/edits", files={"image": ("a.png", buf.getvalue(), "image/png")},
                    data={"prompt": "make it blue", "quality": "fast", "strength": "0.5", "seed": "7"})
    assert r.status_code == 200, r.text
    meta = r.json()["data"][0]["diffserve"]
    assert meta["model"] == "sd-turbo"
    assert base64.b64decode(r.json()["data"][0]["b64_json"]).startswith(b"\x89PNG")


def test_streaming_through_the_ray_proxy_sends_the_light_image_first(engine):
    """Progressive delivery through Serve's proxy: partial (light) image, then the final one."""
    import json

    deployed, client = engine
    body = {"prompt": "a lighthouse at dusk", "seed": 4, "stream": True, "partial_images": 1}
    with client.stream("POST", "/v1/images/generations", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert events[0]["diffserve"]["model"] == "sd-turbo"
    assert base64.b64decode(events[1]["b64_json"]).startswith(b"\x89PNG")


def test_bad_inputs_get_the_embedded_servers_answers(engine):
    """Nested JSON, lone surrogates, oversized bodies...: through Serve's proxy and the Ray
    ingress, the same status and JSON error as the embedded server (tests/bad_inputs.py)."""
    import asyncio

    from bad_inputs import CASES, answer, embedded_answers

    deployed, client = engine
    expected = asyncio.run(embedded_answers())
    for name, (method, path, body) in CASES.items():
        r = client.request(method, path, content=body, headers={"content-type": "application/json"})
        assert answer(r) == expected[name], name


def test_replan_changes_replicas_and_threshold_without_restarts_or_losses(engine):
    deployed, client = engine
    plan = client.get("/v1/plan").json()["plan"]
    light, heavy = plan["light"], plan["heavy"]
    before = {m: {r.pid for r in running(deployed, m)} for m in (light, heavy)}
    n_light, n_heavy = len(before[light]), len(before[heavy])
    assert n_light + n_heavy == 3

    # Move one worker from one pool to the other and change the threshold and a batch size.
    grow, shrink = (light, heavy) if n_heavy > 1 else (heavy, light)
    new = dict(plan)
    new["threshold"] = 0.37 if plan["threshold"] != 0.37 else 0.41
    new["pools"] = []
    for p in plan["pools"]:
        q = dict(p)
        q["workers"] = p["workers"] + (1 if p["model"] == grow else -1 if p["model"] == shrink else 0)
        if p["model"] == light:
            q["batch_size"] = 2
        new["pools"].append(q)
    with ThreadPoolExecutor(8) as ex:
        inflight = [ex.submit(generate, client, seed=100 + i, quality="fast" if i % 2 else "auto") for i in range(8)]
        put = client.put("/v1/plan", json=new)
        assert put.status_code == 200, put.text
        answers = [f.result(timeout=WAIT_S) for f in inflight]
    assert [a.status_code for a in answers] == [200] * 8  # nothing lost or failed across the re-plan

    after = wait_for(
        lambda: (lambda a: a if len(a[grow]) == len(before[grow]) + 1 and len(a[shrink]) == len(before[shrink]) - 1 else None)(
            {m: {r.pid for r in running(deployed, m)} for m in (light, heavy)}
        ),
        "the new replica counts",
    )
    assert before[grow] < after[grow]  # the old replicas kept their processes; one was added
    assert after[shrink] < before[shrink]  # the survivors are old processes, none restarted
    status = client.get("/v1/ray").json()
    assert status["threshold"] == new["threshold"]
    assert status["replica_targets"] == {grow: len(after[grow]), shrink: len(after[shrink])}
    assert client.get("/v1/plan").json()["plan"]["threshold"] == new["threshold"]

    # The light pool forms batches of the new size at once (in the ingress); its replicas run them.
    from ray import serve

    assert status["batch_size"][light] == 2
    with ThreadPoolExecutor(8) as ex:
        burst = [ex.submit(generate, client, seed=200 + i, quality="fast") for i in range(8)]
        assert [f.result(timeout=WAIT_S).status_code for f in burst] == [200] * 8
    handle = serve.get_deployment_handle(deployed.deployments[light], app_name=deployed.app_name)
    infos = [handle.info.remote().result(timeout_s=WAIT_S) for _ in range(6)]
    assert {i["last_batch"] for i in infos if i["batches"] > 0} <= {1, 2}
    assert {i["pid"] for i in infos} <= after[light]


def test_killed_replica_is_restarted_and_no_request_is_lost(engine):
    deployed, client = engine
    plan = client.get("/v1/plan").json()["plan"]
    light, heavy = plan["light"], plan["heavy"]
    pinned = dict(plan)
    pinned["pools"] = [dict(p, workers=1 if p["model"] == light else 2, batch_size=1) for p in plan["pools"]]
    assert client.put("/v1/plan", json=pinned).status_code == 200
    victims = wait_for(lambda: (lambda rs: rs if len(rs) == 2 else None)(running(deployed, heavy)), "two heavy replicas")
    victim = victims[0]
    retries_before = client.get("/v1/ray").json()["retries"][heavy]
    n = 4
    with ThreadPoolExecutor(n) as ex:
        # quality=best goes straight to the heavy pool: 1780 ms of model time = 0.9 s of wall time
        # each; the ingress sends one batch of 1 to each of the 2 replicas (the other 2 jobs wait in
        # its pool), so the victim holds work when killed.
        inflight = [ex.submit(generate, client, seed=300 + i, quality="best") for i in range(n)]
        wait_for(lambda: (lambda s: s["running"][heavy] == 2 and s["queued"][heavy] == 2)(client.get("/v1/ray").json()),
                 "a batch on each heavy replica, two waiting", poll_s=0.05)
        time.sleep(0.2)  # let Serve hand the batches to the replicas (no event to wait on across processes)
        os.kill(victim.pid, signal.SIGKILL)
        answers = [f.result(timeout=WAIT_S) for f in inflight]
    # Every request was answered with its image: the victim's jobs were re-sent to the live replica
    # once, well within the deadline. (A 503 would mean a job met a dead replica twice, a 504 a lost retry.)
    assert [a.status_code for a in answers] == [200] * n, [a.text for a in answers if a.status_code != 200]
    assert client.get("/v1/ray").json()["retries"][heavy] > retries_before  # the victim's jobs were re-sent
    replaced = wait_for(
        lambda: (lambda rs: rs if len(rs) == 2 and victim.pid not in {r.pid for r in rs} else None)(running(deployed, heavy)),
        "Ray to restart the killed replica",
    )
    assert victims[1].pid in {r.pid for r in replaced}  # the other replica was left alone
    assert generate(client, seed=999, quality="best").status_code == 200
    ledger = client.get("/v1/plan").json()["ledger"]
    for unit in ("requests", "images"):
        assert ledger[f"{unit}_accepted"] == ledger[f"{unit}_completed"] + ledger[f"{unit}_failed"] + ledger[f"{unit}_cancelled"]
    assert ledger["images_failed"] == 0


def test_controller_moves_replicas_as_load_changes(engine):
    """The live controller (1 s wall re-plan period here) grows the pools under a burst, via Serve."""
    import asyncio

    from ray import serve

    from diffserve.server.build import ServeOptions

    from diffserve.ray_engine import RayOptions, deploy

    deployed, _ = engine
    serve.delete(deployed.app_name)  # one app owns the route "/"; this is the module's last test
    # spare workers idle, so that the pools visibly grow with the load (with "fill" every worker is busy from the start)
    opts = ServeOptions(backend="emulated", workers=4, speedup=2.0, demand_qps=0.5, replan_interval_ms=2000, slo_ms=5000,
                        spare_workers="idle")
    live = deploy(opts, RayOptions(), port=0)
    with httpx.Client(base_url=live.url, timeout=WAIT_S) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, "readyz")
        # An idle spell (demand falls to the floor), then a burst: the plan must follow both ways.
        wait_for(lambda: len(client.get("/v1/plan").json()["decisions"]) >= 3, "two re-plans while idle", poll_s=0.5)

        async def burst(qps: float, seconds: float) -> list[int]:
            async with httpx.AsyncClient(base_url=live.url, timeout=WAIT_S) as ac:
                tasks = []
                for i in range(int(qps * seconds)):
                    tasks.append(asyncio.create_task(ac.post("/v1/images/generations", json={"prompt": f"p{i}", "seed": i})))
                    await asyncio.sleep(1 / qps)
                return [r.status_code for r in await asyncio.gather(*tasks)]

        codes = asyncio.run(burst(12.0, 6.0))  # 6 model-time QPS against a plan made for 0.5
        assert all(c in (200, 429, 503) for c in codes), codes
        assert codes.count(200) >= len(codes) // 2
        decisions = [d for d in client.get("/v1/plan").json()["decisions"] if d["applied"]]
        assert max(d["demand_qps"] for d in decisions) > 4.0, decisions  # the controller saw the burst
        maps = {tuple(sorted(d["workers"].items())) for d in decisions}
        assert len(maps) >= 2, f"the controller never changed the replica counts: {decisions}"
        # Serve runs what the controller asked for last (the external scaler's targets).
        wait_for(
            lambda: (lambda last: all(len(running(live, m)) == last.get(m, 0) for m in live.deployments))(
                client.get("/v1/plan").json()["decisions"][-1]["workers"]
            ),
            "Serve's replicas to match the controller's last decision",
        )


@pytest.mark.slow
def test_diffusers_backend_on_ray_with_tiny_random_models(cluster, tmp_path):
    """Real (random-weight) tiny pipelines in pool replicas; the heavy replica answers a deferral."""
    import io

    from PIL import Image
    from ray import serve

    from diffserve.server.testing import tiny_diffusers_files

    from diffserve.ray_engine import RayOptions, deploy

    opts = tiny_diffusers_files(tmp_path, threshold=1.0)
    serve.delete("diffserve")  # one app owns the route "/"
    live = deploy(opts, RayOptions(num_cpus=0.5), port=0)
    try:
        with httpx.Client(base_url=live.url, timeout=300) as client:
            r = client.post("/v1/images/generations", json={"prompt": "a watercolour fox", "seed": 1, "size": "64x64"})
            assert r.status_code == 200, r.text
            meta = r.json()["data"][0]["diffserve"]
            img = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
            assert img.size == (64, 64)
            assert meta["model"] == "tiny-base" and meta["confidence"] < 1.0  # threshold 1 defers everything
            assert meta["random_weights"] is True
    finally:
        serve.delete("diffserve")



def test_two_ingress_replicas_serve_their_shares_of_one_plan(cluster):
    """--ray-ingresses 2: Serve's proxy spreads requests over two ingress replicas, each with its
    share of the worker slots; a plan pinned through either is run by both, and the deployments'
    replicas follow the cluster plan's totals."""
    from ray import serve

    from diffserve.planner import solve_plan
    from diffserve.server.build import ServeOptions

    from diffserve.artifacts import load_cascade, load_profile
    from diffserve.ray_engine import RayOptions, deploy, scaler
    from diffserve.ray_engine.ingresses import kill_board

    serve.delete("diffserve")  # one app owns the route "/"
    opts = ServeOptions(backend="emulated", workers=4, speedup=2.0, demand_qps=1.0, replan_interval_ms=3.6e6, slo_ms=60_000)
    live = deploy(opts, RayOptions(ingress_replicas=2), port=0)
    try:
        with httpx.Client(base_url=live.url, timeout=WAIT_S) as client:
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda i: generate(client, seed=i), range(12)))
            assert [r.status_code for r in answers] == [200] * 12, [r.text[:200] for r in answers if r.status_code != 200]
            views: dict[int, dict] = {}

            def both_seen() -> bool:
                view = client.get("/v1/ray").json()["ingress"]
                views[view["rank"]] = view
                return set(views) == {0, 1}

            wait_for(both_seen, "both ingress replicas answering through the proxy")
            assert [views[r]["plans"] for r in (0, 1)] == [True, False]  # one controller
            plan = client.get("/v1/plan").json()["plan"]
            for model in {p["model"] for p in plan["pools"]}:
                total = next(p["workers"] for p in plan["pools"] if p["model"] == model)
                assert sum(views[r]["workers"].get(model, 0) for r in (0, 1)) >= total  # every slot has an ingress

            profile, cascade = load_profile("reference"), load_cascade("reference")
            pinned = solve_plan(profile, cascade, demand_qps=2.0, slo_ms=60_000, workers=4, policy="clipper-light")
            r = client.put("/v1/plan", json={"plan": pinned.model_dump(mode="json")})
            assert r.status_code == 200, r.text
            seen: set[int] = set()

            def both_pinned() -> bool:
                view = client.get("/v1/plan").json()
                if view["pinned"] and view["plan"]["policy"] == "clipper-light":
                    seen.add(view["ingress"]["rank"])
                return seen == {0, 1}

            wait_for(both_pinned, "the pinned plan on both ingress replicas")
            light = pinned.light
            wait_for(lambda: len([x for x in scaler.replicas(live.app_name, live.deployments[light]) if x.state == "RUNNING"]) == 4,
                     "the light deployment at the pinned plan's 4 replicas")
            assert generate(client, seed=99).status_code == 200
    finally:
        serve.delete("diffserve")
        kill_board("diffserve")
