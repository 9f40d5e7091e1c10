"""Multi-node scenarios for tests/test_cluster.py, run in their own process (a fresh Ray driver:
the test session may already hold a local Ray of its own).

    python -m tests.cluster_scenarios multinode MODEL_DIR RUN_DIR OUT_JSON

Builds a four-node cluster on this machine with ``ray.cluster_utils.Cluster`` (custom resources say
what each node is for), runs one Dynamic Alignment iteration with the roles pinned and spread by
the config, and writes where every actor ran (plus the fail-fast checks) to OUT_JSON.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multinode(model_path: str, run_dir: str, out_json: str) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group_table

    from dynalign import driver, placement
    from dynalign.config import ConfigError
    from tests.conftest import tiny_config

    result: dict = {}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port(),
        "resources": {"head_node": 1}})
    nodes = {"head": cluster.head_node.node_id}
    nodes["engines"] = cluster.add_node(num_cpus=2, resources={"engine_node": 2}).node_id
    nodes["learner_a"] = cluster.add_node(num_cpus=1, resources={"learner_node": 1}).node_id
    nodes["learner_b"] = cluster.add_node(num_cpus=1, resources={"learner_node": 1}).node_id
    cluster.wait_for_nodes()
    result["nodes"] = nodes
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING",
                                                                    "TOKENIZERS_PARALLELISM": "false"}})
        config = tiny_config(model_path, Path(run_dir), "judge.kind=rule", "iterations=1",
                             "rollout.num_workers=2", "rollout.resources={engine_node: 1}",
                             "rollout.placement_strategy=PACK",
                             "learner.resources_per_rank={learner_node: 1}",
                             "learner.placement_strategy=STRICT_SPREAD", "checkpoint.save_final_policy=false")

        # 1. Fail fast, one line: more of a custom resource per engine than any node has; five
        #    learner ranks on distinct nodes of a four-node cluster.
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

        # 2. Tensor-parallel engines, one STRICT_PACK group per engine, pinned to distinct nodes
        #    (placement groups only: no vLLM engine on CPU runs tensor-parallel here).
        tp_config = tiny_config(model_path, Path(run_dir), "judge.kind=rule", "rollout.tensor_parallel_size=2",
                                "rollout.num_workers=2", "rollout.placement_strategy=STRICT_SPREAD",
                                "rollout.num_cpus_per_worker=0.25", "rollout.resources={learner_node: 0.25}")
        request = placement.role_requests(tp_config)[0]
        alive = placement.cluster_nodes()
        plan = placement.place_units(request, [placement.Node(n.node_id, n.address, n.resources) for n in alive])
        tp = placement.EnginePlacement(tp_config, "rollout", plan, alive)
        try:
            result["tp_groups"] = [sorted(set(placement_group_table(g)["bundles_to_node_id"].values()))
                                   for g in tp.groups]
            result["tp_options_env"] = [tp.options(i, {})["runtime_env"]["env_vars"] for i in range(2)]
        finally:
            tp.remove()

        # 3. The loop, with two engines packed on the engine node and the learner ranks spread.
        original = driver.System.start.__func__

        def start(cls, config, run_dir):
            system = original(cls, config, run_dir)
            result["rollout_nodes"] = [info["node_id"] for info in system.rollout.infos]
            result["learner_nodes"] = [info["node_id"] for info in system.learner.infos]
            return system

        driver.System.start = classmethod(start)
        started = time.perf_counter()
        summary = driver.train(config)
        result["train_seconds"] = time.perf_counter() - started
        result["iterations"] = summary["iterations"]
        result["reward_mean"] = summary["reward_mean_per_iteration"]
    finally:
        Path(out_json).write_text(json.dumps(result, indent=2))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    scenario, *args = sys.argv[1:]
    {"multinode": multinode}[scenario](*args)
