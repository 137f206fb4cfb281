"""Tripwire for the Ray Serve internals that diffserve.ray_engine.scaler relies on.

These names are private to Ray. A Ray upgrade that moves one must fail here, by name, before it
fails in production as a controller that silently stops scaling. No cluster needed.
"""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")


def test_controller_actor_is_found_by_these_names():
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    assert isinstance(SERVE_CONTROLLER_NAME, str) and SERVE_CONTROLLER_NAME
    assert isinstance(SERVE_NAMESPACE, str) and SERVE_NAMESPACE


def test_deployment_id_takes_name_and_app_name():
    from ray.serve._private.common import DeploymentID

    dep = DeploymentID(name="Pool_sd-turbo", app_name="diffserve")
    assert (dep.name, dep.app_name) == ("Pool_sd-turbo", "diffserve")


def test_controller_methods_keep_their_signatures():
    from ray.serve._private.controller import ServeController

    scale = inspect.signature(ServeController.update_deployment_replicas)
    assert list(scale.parameters) == ["self", "deployment_id", "target_num_replicas"], scale
    details = inspect.signature(ServeController.get_serve_instance_details)
    assert all(p.default is not inspect.Parameter.empty for n, p in details.parameters.items() if n != "self"), details
    assert "self" in inspect.signature(ServeController.get_http_config).parameters


def test_replica_details_still_carry_pid_and_state():
    from ray.serve.schema import DeploymentDetails, ReplicaDetails

    assert {"pid", "state", "replica_id", "actor_name", "node_ip"} <= set(ReplicaDetails.model_fields)
    assert {"replicas", "target_num_replicas"} <= set(DeploymentDetails.model_fields)


def test_public_pieces_we_build_on():
    from ray import serve

    assert "external_scaler_enabled" in inspect.signature(serve.run).parameters

    class Probe:
        @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.0)
        async def run(self, xs):
            return xs

    # the setters ModelPool.reconfigure uses to change the batch live
    assert callable(Probe.run.set_max_batch_size) and callable(Probe.run.set_batch_wait_timeout_s)


def test_negative_target_is_refused_before_any_ray_call():
    from diffserve.ray_engine import scaler

    with pytest.raises(ValueError, match="-1"):
        scaler.set_replicas("diffserve", "Pool_sd-turbo", -1)
