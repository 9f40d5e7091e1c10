"""A four-node Ray cluster on this machine for tests/test_cluster.py, in its own process (a fresh
Ray driver: the test session may already hold a local Ray of its own).

    python -m tests.cluster_scenarios TEMP_DIR MODEL_DIR RUN_DIR OUT_JSON

Builds the cluster with ``ray.cluster_utils.Cluster`` (custom resources say what each node is
for; the head serves the job API on loopback; token authentication when the environment asks for
it, RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH, which every node inherits), runs the placement
checks that need no training from a driver of its own, writes the cluster's addresses and the
results to OUT_JSON, and keeps the cluster up until its stdin closes (or SIGTERM): the tests
submit jobs to it meanwhile.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from pathlib import Path

from dynalign.placement import LOCAL_START_ATTEMPTS, _stop_half_started_ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def placement_checks(model_path: str, run_dir: str) -> dict:
    """On the connected cluster: requests that cannot be placed fail fast in one line, and
    tensor-parallel engines get one STRICT_PACK group each, on distinct nodes."""
    from ray.util.placement_group import placement_group_table

    from dynalign import driver, placement
    from dynalign.config import ConfigError
    from tests.conftest import tiny_config

    result: dict = {}
    # More of a custom resource per engine than any node has; five learner ranks on distinct nodes
    # of a four-node cluster.
    for key, overrides in (("engine_too_big", ["rollout.resources={engine_node: 3}"]),
                           ("learner_spread", ["learner.num_ranks=5", "learner.micro_batch_size=1",
                                               "data.prompts_per_iteration=5", "learner.resources_per_rank={}"])):
        bad = tiny_config(model_path, Path(run_dir), "judge.kind=rule", "rollout.resources={engine_node: 1}",
                          "learner.resources_per_rank={learner_node: 1}",
                          "learner.placement_strategy=STRICT_SPREAD", *overrides)
        started = time.perf_counter()
        try:
            driver.System.start(bad, Path(run_dir))
            result[key] = {"error": None}
        except ConfigError as err:
            result[key] = {"error": str(err), "seconds": time.perf_counter() - started}

    # Placement groups only: no vLLM engine on CPU runs tensor-parallel here.
    tp_config = tiny_config(model_path, Path(run_dir), "judge.kind=rule", "rollout.tensor_parallel_size=2",
                            "rollout.num_workers=2", "rollout.placement_strategy=STRICT_SPREAD",
                            "rollout.num_cpus_per_worker=0.25", "rollout.resources={learner_node: 0.25}")
    request = placement.role_requests(tp_config)[0]
    alive = placement.cluster_nodes()
    plan = placement.place_units(request, [placement.Node(n.node_id, n.address, n.resources) for n in alive])
    tp = placement.EnginePlacement(tp_config, "rollout", plan, alive)
    try:
        result["tp_groups"] = [sorted(set(placement_group_table(g)["bundles_to_node_id"].values())) for g in tp.groups]
        result["tp_options_env"] = [tp.options(i, {})["runtime_env"]["env_vars"] for i in range(2)]
    finally:
        tp.remove()
    return result


def serve(temp_dir: str, model_path: str, run_dir: str, out_json: str) -> None:
    import ray
    from ray._private.utils import write_ray_address
    from ray.cluster_utils import Cluster

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # shut the cluster down on the way out
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        dashboard_port = _free_port()
        # Every port of the head free, not Ray's defaults: other Rays run on this machine meanwhile
        # (the test session's own, another pytest worker's), and a head whose job agent could not
        # bind its port refuses every job ("No available agent to submit job").
        ports = {name: _free_port() for name in ("gcs_server_port", "dashboard_agent_listen_port", "metrics_agent_port",
                                                 "metrics_export_port", "runtime_env_agent_port")}
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
                "resources": {"head_node": 1}, "temp_dir": temp_dir, **ports})
            break
        except Exception as error:
            # Ray gives the raylet a fixed 30 s to register; a machine busy starting the other
            # pytest worker's stack can pass it. As start_local_ray does: clean up, start again.
            if "timed out during startup" not in str(error) or attempt == LOCAL_START_ATTEMPTS:
                raise
            print(f"head node start timed out (attempt {attempt}); starting it again", flush=True)
            _stop_half_started_ray(ports["gcs_server_port"])
    # What `ray start --head` leaves behind and `Cluster` does not: the job supervisor finds the
    # cluster its jobs' drivers connect to here, and otherwise takes any Ray on the machine.
    write_ray_address(cluster.address, temp_dir)
    try:
        nodes = {"head": cluster.head_node.node_id}
        nodes["engines"] = cluster.add_node(num_cpus=2, resources={"engine_node": 2}, temp_dir=temp_dir).node_id
        nodes["learner_a"] = cluster.add_node(num_cpus=1, resources={"learner_node": 1}, temp_dir=temp_dir).node_id
        nodes["learner_b"] = cluster.add_node(num_cpus=1, resources={"learner_node": 1}, temp_dir=temp_dir).node_id
        cluster.wait_for_nodes()
        result = {"address": f"http://127.0.0.1:{dashboard_port}", "gcs": cluster.address, "nodes": nodes}
        ray.init(address=cluster.address, runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING",
                                                                    "TOKENIZERS_PARALLELISM": "false"}})
        try:
            result.update(placement_checks(model_path, run_dir))
        finally:
            ray.shutdown()  # the jobs the tests submit get the whole cluster
        temp = Path(out_json).with_suffix(".tmp")
        temp.write_text(json.dumps(result, indent=2))
        temp.replace(out_json)
        sys.stdin.read()  # until the test closes the pipe
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    serve(*sys.argv[1:])
