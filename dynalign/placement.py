"""Where each role runs: resources per role from the config, a fit check against the cluster
before anything starts, and placement groups for the vLLM engines.

Roles and their bundles (one bundle = resources that land on one node):

- rollout / judge engines: ``tensor_parallel_size`` bundles of ``{CPU: num_cpus_per_worker,
  GPU: num_gpus_per_worker, **resources}`` per engine, always on one node (vLLM's tensor-parallel
  ranks talk over NVLink/PCIe). ``placement_strategy`` spreads or packs the engines.
- learner: ``num_ranks`` bundles of ``{CPU: num_cpus_per_rank, GPU: num_gpus_per_rank,
  **resources_per_rank}``; Ray Train places them with ``learner.placement_strategy``.
- the driver, the learner's command channel and Ray Train's controller reserve nothing.

Placement groups for engines: when ``tensor_parallel_size == 1`` or the role's strategy is
``STRICT_PACK``, one group holds every engine of the role (engine i owns bundles
``[i*tp, (i+1)*tp)``, named to vLLM through ``VLLM_RAY_BUNDLE_INDICES``) and Ray applies the
strategy exactly. Otherwise each engine gets its own ``STRICT_PACK`` group; for ``SPREAD`` and
``STRICT_SPREAD`` each engine's group is pinned (``ray.io/node-id`` label selector) to the node the
fit check planned for it, distinct nodes first.

``check_fits`` simulates that placement on the nodes' total resources, role by role in the order
the system starts them (rollout, judge, learner), and raises a one-line ``ConfigError`` naming the
role, what it needs and what the cluster has, instead of leaving Ray pending forever.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynalign.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

# How often a local Ray start is tried when Ray's own start-up deadline passes.
LOCAL_START_ATTEMPTS = 3

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
NODE_ID_LABEL = "ray.io/node-id"
_SKIP_CHECK = "cluster.check_resources=false skips this check"


# ---------------------------------------------------------------------------------------------
# What each role asks for
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoleRequest:
    """One role's resources: ``units`` engines (or ranks), each ``bundles_per_unit`` bundles on one node."""

    role: str
    units: int
    bundles_per_unit: int
    bundle: dict[str, float]
    strategy: str
    keys: dict[str, str]  # what -> config key: "units", "tp", "strategy", "CPU", "GPU", "custom"
    unit_name: str = "engine"

    def key(self, what: str) -> str:
        return self.keys.get(what) or self.keys["custom"]

    @property
    def unit(self) -> dict[str, float]:
        """Resources of one unit (all its bundles share a node)."""
        return {k: v * self.bundles_per_unit for k, v in self.bundle.items()}

    def total(self) -> dict[str, float]:
        return {k: v * self.units for k, v in self.unit.items()}

    def describe(self) -> str:
        per = (f"{self.bundles_per_unit} bundles of {fmt(self.bundle)} on one node"
               if self.bundles_per_unit > 1 else fmt(self.bundle))
        plural = "s" if self.units != 1 else ""
        return f"{self.units} {self.unit_name}{plural} x {per} ({self.strategy})"


def bundle_resources(cpus: float, gpus: float, extra: dict | None = None) -> dict[str, float]:
    bundle = {"CPU": float(cpus), "GPU": float(gpus), **{str(k): float(v) for k, v in (extra or {}).items()}}
    return {k: v for k, v in bundle.items() if v > 0}


def role_requests(config: TrainConfig) -> list[RoleRequest]:
    """What every role of a run asks Ray for, in the order the system starts them."""
    rollout, judge, learner = config.rollout, config.judge, config.learner
    tp = rollout.tensor_parallel_size
    requests = [RoleRequest(
        "rollout", rollout.num_workers, tp,
        bundle_resources(rollout.num_cpus_per_worker, rollout.num_gpus_per_worker, rollout.resources),
        rollout.placement_strategy, _keys("rollout", "num_workers", "worker", "resources"))]
    if judge.actor_count:
        requests.append(RoleRequest(
            "judge", judge.num_workers, tp,
            bundle_resources(judge.num_cpus_per_worker, judge.num_gpus_per_worker, judge.resources),
            judge.placement_strategy, _keys("judge", "num_workers", "worker", "resources")))
    requests.append(RoleRequest(
        "learner", learner.num_ranks, 1,
        bundle_resources(learner.num_cpus_per_rank, learner.num_gpus_per_rank, learner.resources_per_rank),
        learner.placement_strategy, _keys("learner", "num_ranks", "rank", "resources_per_rank"), unit_name="rank"))
    return requests


def single_engine_request(config: TrainConfig, role: str) -> RoleRequest:
    """One engine outside a run's roles (an eval engine) with the rollout engines' resources:
    ``tensor_parallel_size`` bundles on one node."""
    rollout = config.rollout
    return RoleRequest(role, 1, rollout.tensor_parallel_size,
                       bundle_resources(rollout.num_cpus_per_worker, rollout.num_gpus_per_worker, rollout.resources),
                       "STRICT_PACK", _keys("rollout", "num_workers", "worker", "resources"))


def local_cpus_needed(config: TrainConfig) -> float:
    """Logical CPUs every role of a run reserves (for a local Ray)."""
    generators = sum(g.source == "vllm" for g in config.generation.generators) if config.generation.enabled else 0
    return (config.rollout.num_workers * config.rollout.num_cpus_per_worker
            + config.judge.actor_count * config.judge.num_cpus_per_worker
            + config.learner.num_ranks * config.learner.num_cpus_per_rank
            + generators * config.rollout.num_cpus_per_worker)


def _keys(section: str, count: str, per: str, custom: str) -> dict[str, str]:
    return {"units": f"{section}.{count}", "tp": "rollout.tensor_parallel_size",
            "strategy": f"{section}.placement_strategy", "CPU": f"{section}.num_cpus_per_{per}",
            "GPU": f"{section}.num_gpus_per_{per}", "custom": f"{section}.{custom}"}


def fix_hint(request: RoleRequest, nodes: list[Node], config: TrainConfig, others: list[str] = ()) -> str:
    """Which options to change: the resource one unit lacks on every node, else the count, else
    the strategy; each named with its current value."""
    also = f" or what {' and '.join(others)} take" if others else ""
    def named(what: str) -> str:
        key = request.key(what)
        value = _lookup(config, key)
        if what not in ("units", "tp", "strategy", "CPU", "GPU"):
            return f"{key}.{what} = {value.get(what) if isinstance(value, dict) else value}"
        return f"{key} = {value}"

    largest = {k: max((n.free.get(k, 0.0) for n in nodes), default=0.0) for k in request.unit}
    too_big = [k for k, v in request.unit.items() if v > largest[k] + 1e-9]
    if too_big:
        keys = [named(k) for k in too_big]
        if request.bundles_per_unit > 1 and all(request.bundle[k] <= largest[k] + 1e-9 for k in too_big):
            keys.append(named("tp"))
        return f"lower {' or '.join(keys)}{also}, or add nodes with more {'/'.join(too_big)}"
    totals = {k: sum(n.free.get(k, 0.0) for n in nodes) for k in request.unit}
    short = [k for k, v in request.total().items() if v > totals[k] + 1e-9]
    if short:
        return f"lower {named('units')} or {' or '.join(named(k) for k in short)}{also}, or add nodes"
    return f"change {named('strategy')}{also}, or add nodes"


def _lookup(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


# ---------------------------------------------------------------------------------------------
# The fit check
# ---------------------------------------------------------------------------------------------

@dataclass
class Node:
    node_id: str
    address: str
    resources: dict[str, float]  # totals
    free: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not self.free:
            self.free = dict(self.resources)

    def fits(self, demand: dict[str, float]) -> bool:
        return all(self.free.get(k, 0.0) + 1e-9 >= v for k, v in demand.items())

    def take(self, demand: dict[str, float]) -> None:
        for k, v in demand.items():
            self.free[k] = self.free.get(k, 0.0) - v


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster, with their total resources."""
    import ray

    return [Node(n["NodeID"], n.get("NodeManagerAddress", "?"), dict(n.get("Resources", {})))
            for n in ray.nodes() if n.get("Alive")]


def place_units(request: RoleRequest, nodes: list[Node]) -> list[int] | None:
    """Node index per unit, taking the resources from ``nodes``; None (nothing taken) if it cannot
    fit. A greedy simulation of Ray's placement strategies (first fit in node order)."""
    demand = request.unit
    if request.units == 0:
        return []
    if request.strategy == "STRICT_PACK":  # the whole role on one node
        total = request.total()
        for index, node in enumerate(nodes):
            if node.fits(total):
                node.take(total)
                return [index] * request.units
        return None
    snapshot = [dict(n.free) for n in nodes]
    chosen: list[int] = []
    for _ in range(request.units):
        used = set(chosen)
        candidates = [i for i, n in enumerate(nodes) if n.fits(demand)]
        if request.strategy == "STRICT_SPREAD":
            candidates = [i for i in candidates if i not in used]
        elif request.strategy == "SPREAD":
            fresh = [i for i in candidates if i not in used]
            candidates = fresh or sorted(candidates, key=chosen.count)
        if not candidates:
            for node, free in zip(nodes, snapshot):
                node.free = free
            return None
        nodes[candidates[0]].take(demand)
        chosen.append(candidates[0])
    return chosen


def check_fits(config: TrainConfig, nodes: list[Node] | None = None) -> dict[str, list[int]]:
    """Raise a one-line ``ConfigError`` if some role cannot be placed on the cluster.

    Returns the planned node index of each unit per role (used to pin spread engines)."""
    requests = role_requests(config)
    if nodes is None:
        nodes = cluster_nodes()
    have = cluster_summary(nodes, requests)
    for request in requests:  # alone, on an empty cluster
        empty = [Node(n.node_id, n.address, n.resources) for n in nodes]
        if place_units(request, empty) is None:
            raise ConfigError(f"cannot place {request.role}: it needs {request.describe()} "
                              f"= {fmt(request.total())} in all; the cluster has {have}; "
                              f"{fix_hint(request, empty, config)} ({_SKIP_CHECK})")
    plan, placed = {}, []
    simulated = [Node(n.node_id, n.address, n.resources) for n in nodes]
    for request in requests:  # together, in start order
        units = place_units(request, simulated)
        if units is None:
            left = "; ".join(f"{_label(n, simulated)} {fmt(_positive(n.free), keys=_shown(requests))}"
                             for n in simulated)
            raise ConfigError(f"cannot place {request.role} next to {' and '.join(placed)}: {request.role} needs "
                              f"{request.describe()}; {' and '.join(placed)} leave {left or 'nothing'}; the cluster "
                              f"has {have}; {fix_hint(request, simulated, config, placed)} ({_SKIP_CHECK})")
        plan[request.role] = units
        placed.append(request.role)
    return plan


def cluster_summary(nodes: list[Node], requests: list[RoleRequest] | None = None) -> str:
    keys = _shown(requests or [])
    totals: dict[str, float] = {}
    for node in nodes:
        for k in keys:
            totals[k] = totals.get(k, 0.0) + node.resources.get(k, 0.0)
    per_node = "; ".join(f"{_label(n, nodes)} {fmt(n.resources, keys=keys)}" for n in nodes)
    plural = "s" if len(nodes) != 1 else ""
    return f"{fmt(totals, keys=keys)} on {len(nodes)} node{plural} ({per_node})" if nodes else "no alive nodes"


def _label(node: Node, nodes: list[Node]) -> str:
    """The node's address, with a short node id where several nodes share it."""
    shared = sum(n.address == node.address for n in nodes) > 1
    return f"{node.address}/{node.node_id[:6]}" if shared else node.address


def _shown(requests: list[RoleRequest]) -> list[str]:
    keys = ["CPU", "GPU"]
    for request in requests:
        keys += [k for k in request.bundle if k not in keys]
    return keys


def _positive(resources: dict[str, float]) -> dict[str, float]:
    return {k: max(v, 0.0) for k, v in resources.items()}


def fmt(resources: dict[str, float], keys: list[str] | None = None) -> str:
    items = [(k, resources.get(k, 0.0)) for k in keys] if keys else list(resources.items())
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in items) + "}" if items else "{}"


# ---------------------------------------------------------------------------------------------
# Placement groups for engines
# ---------------------------------------------------------------------------------------------

class EnginePlacement:
    """Placement groups for the engines of one role; ``options(i)`` are engine i's actor options."""

    def __init__(self, config: TrainConfig, role: str, plan: list[int] | None = None,
                 nodes: list[Node] | None = None, request: RoleRequest | None = None):
        import ray
        from ray.util.placement_group import placement_group

        request = request or next(r for r in role_requests(config) if r.role == role)
        self.request, self.role = request, role
        self.tp = request.bundles_per_unit
        self.groups: list[Any] = []
        self.first_bundle: list[tuple[int, int]] = []  # (group index, first bundle) per engine
        if not request.bundle:  # nothing reserved (e.g. num_cpus_per_worker=0 on CPU): plain actors
            return
        strategy = request.strategy
        if self.tp == 1 or strategy == "STRICT_PACK":
            self.groups.append(placement_group([dict(request.bundle)] * (request.units * self.tp), strategy=strategy,
                                               name=f"dynalign-{role}"))
            self.first_bundle = [(0, i * self.tp) for i in range(request.units)]
        else:
            pin = strategy in ("SPREAD", "STRICT_SPREAD") and plan is not None and nodes is not None
            for i in range(request.units):
                selector = [{NODE_ID_LABEL: nodes[plan[i]].node_id}] * self.tp if pin else None
                self.groups.append(placement_group([dict(request.bundle)] * self.tp, strategy="STRICT_PACK",
                                                   name=f"dynalign-{role}-{i}", bundle_label_selector=selector))
                self.first_bundle.append((i, 0))
        timeout = config.cluster.placement_timeout_s
        try:
            ray.get([g.ready() for g in self.groups], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self.remove()
            have = cluster_summary(cluster_nodes(), [request])
            raise ConfigError(f"{role} placement ({request.describe()}) not placed within cluster.placement_timeout_s = "
                              f"{timeout:g} s; the cluster has {have}; free resources or raise the timeout") from None

    def options(self, index: int, env_vars: dict[str, str]) -> dict[str, Any]:
        """``ray.remote(...).options(**...)`` for engine ``index``, its runtime env included."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = self.request.bundle
        env = dict(env_vars)
        if not self.groups:
            return {"num_cpus": 0, "num_gpus": 0, "runtime_env": {"env_vars": env}}
        group, first = self.first_bundle[index]
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        if self.tp == 1:  # the engine actor owns its bundle
            options = {"num_cpus": bundle.get("CPU", 0.0), "num_gpus": bundle.get("GPU", 0.0), "resources": custom}
        else:  # vLLM's Ray executor puts one worker (GPU share) in each of the engine's bundles
            options = {"num_cpus": bundle.get("CPU", 0.0), "num_gpus": 0}
            env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(str(first + r) for r in range(self.tp))
            if bundle.get("GPU"):
                env["VLLM_RAY_PER_WORKER_GPUS"] = f"{bundle['GPU']:g}"
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=self.groups[group], placement_group_bundle_index=first,
            placement_group_capture_child_tasks=self.tp > 1)
        options["runtime_env"] = {"env_vars": env}
        return options

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            try:
                remove_placement_group(group)
            except Exception:  # already gone with the cluster
                pass
        self.groups = []


def engine_placement(config: TrainConfig, role: str) -> EnginePlacement:
    """Placement groups for ``role``'s engines, after a fit check when ``cluster.check_resources``."""
    plan = nodes = None
    if config.cluster.check_resources:
        nodes = cluster_nodes()
        plan = check_fits(config, nodes).get(role)
    return EnginePlacement(config, role, plan, nodes)


# ---------------------------------------------------------------------------------------------
# Ray's own output
# ---------------------------------------------------------------------------------------------

def quiet_ray_options(quiet: bool) -> dict:
    """ray.init options that keep the actors' output (vLLM, DeepSpeed, transformers) and Ray's own
    notices off the console; it stays in the session's log files (``link_ray_logs``). A role
    that fails still reaches the console: its error (and a rank's traceback) travels back to the
    driver with the failed call."""
    import logging

    return {"log_to_driver": False, "logging_level": logging.ERROR} if quiet else {}


def link_ray_logs(run_dir: Path) -> Path | None:
    """run_dir/logs/ray -> this Ray session's log directory (every actor's stdout and stderr)."""
    import ray

    try:
        target = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API for it
    except Exception:
        return None
    link = Path(run_dir) / "logs" / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return link


def init_ray(config: TrainConfig, cpus_needed: float | None = None) -> bool:
    """Join ``cluster.address`` (or RAY_ADDRESS: inside a Ray job, `dynalign submit`, it names the
    cluster), or start a new local Ray with room for ``cpus_needed`` logical CPUs (default: every
    role of a run); returns whether this call initialised Ray (False: it already was)."""
    import math

    import ray

    if ray.is_initialized():
        return False
    env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    quiet = not config.logging.verbose  # the actors' own output stays in Ray's session logs
    address = config.cluster.address or os.environ.get("RAY_ADDRESS", "").strip() or None
    if address and not address.startswith(("http://", "https://")):  # not a job-submission (dashboard) address
        from dynalign.submit import driver_runtime_env

        ray.init(address=address, runtime_env=driver_runtime_env({"env_vars": env}), **quiet_ray_options(quiet))
        return True
    # Logical CPUs: tiny CPU runs oversubscribe the cores on purpose (engines idle while the learner steps).
    needed = local_cpus_needed(config) if cpus_needed is None else cpus_needed
    start_local_ray(config.cluster.num_cpus or max(os.cpu_count() or 1, math.ceil(needed)), env, quiet=quiet)
    return True


def start_local_ray(num_cpus: int, env_vars: dict[str, str], quiet: bool = False) -> None:
    """A new local Ray cluster for this process, even when other Ray clusters run on the machine.

    Ray's own helpers inside the cluster (Ray Train's state actor and placement-group cleaner) look
    the cluster up by address=None: with two local clusters that finds both and fails ("Found
    multiple active Ray instances"). The GCS port is chosen here so that every worker can be told
    its own cluster's address through RAY_ADDRESS."""
    import socket

    import ray

    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        address = f"{ray.util.get_node_ip_address()}:{port}"
        previous = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the head node at start (ray._private.node)
        try:
            ray.init(address="local", num_cpus=num_cpus,
                     runtime_env={"env_vars": {**env_vars, "RAY_ADDRESS": address}}, **quiet_ray_options(quiet))
            return
        except Exception as error:
            # Ray gives its raylet a fixed 30 s to register (ray._private.node); on a machine whose
            # cores are busy with other work that can pass. A second start usually succeeds.
            if "timed out during startup" not in str(error) or attempt == LOCAL_START_ATTEMPTS:
                raise
            log.warning("local Ray start timed out (attempt %d of %d, machine busy?); starting it again",
                        attempt, LOCAL_START_ATTEMPTS)
            _stop_half_started_ray(port)
        finally:
            if previous is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = previous


def _stop_half_started_ray(gcs_port: int) -> None:
    """Kill what a failed ``ray.init`` left running: Ray raises before it records the node, so
    ``ray.shutdown`` does not know these processes. Each of them names the GCS port on its command line."""
    import psutil
    import ray

    ray.shutdown()

    def names_port(process) -> bool:
        command = " ".join(_cmdline(process))
        return f":{gcs_port}" in command or f"={gcs_port}" in command

    named = [child for child in psutil.Process().children(recursive=True) if names_port(child)]
    leftovers = {process.pid: process for process in named}
    for process in named:  # the raylet's agents retitle themselves ("ray::DashboardAgent")
        try:
            leftovers.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.Error:
            pass
    leftovers = list(leftovers.values())
    for child in leftovers:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=10)


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []
