"""Running on a Ray cluster: the fit check and placement (dynalign/placement.py), job submission
with token authentication (dynalign/submit.py), the GPU configs.

Fast tests check the pure parts against simulated nodes. The slow ones share one real four-node
Ray cluster on this machine (``ray.cluster_utils.Cluster``, token authentication, the job API on
loopback): `dynalign submit` sends a run to it, and the roles land where the config says.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from dynalign.config import ConfigError, load_config
from dynalign.placement import (
    Node,
    check_fits,
    place_units,
    role_requests,
)
from tests.conftest import REPO

GPU_CONFIGS = ["gpu_1x.yaml", "gpu_8x.yaml", "paper_gpt-oss-20b_2x8.yaml", "paper_gpt-oss-20b_lora_1x8.yaml"]
VENV_BIN = Path(sys.executable).parent


def _nodes(*resources: dict) -> list[Node]:
    return [Node(f"{i:056x}", f"10.0.0.{i + 1}", dict(r)) for i, r in enumerate(resources)]


def _smoke(*overrides: str):
    return load_config(REPO / "configs/smoke.yaml", list(overrides))


# ---------------------------------------------------------------------------------------------
# GPU configs: load and validate on CPU, and fit the hardware they state
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_config_validates_on_cpu(name, capsys):
    from dynalign.cli import main

    assert main(["config", "--config", str(REPO / "configs" / name)]) == 0
    assert "num_gpus_per_worker" in capsys.readouterr().out
    text = (REPO / "configs" / name).read_text()
    assert text.startswith("#") and "Expects:" in text


def test_gpu_1x_shares_one_gpu():
    config = load_config(REPO / "configs/gpu_1x.yaml")
    shares = sum(r.total().get("GPU", 0.0) for r in role_requests(config))
    assert shares <= 1.0 + 1e-9
    assert config.rollout.sleep_while_learning
    plan = check_fits(config, _nodes({"CPU": 8, "GPU": 1}))
    assert plan == {"rollout": [0], "judge": [0], "learner": [0]}


def test_gpu_8x_needs_eight_gpus():
    config = load_config(REPO / "configs/gpu_8x.yaml")
    assert sum(r.total().get("GPU", 0.0) for r in role_requests(config)) == 8
    check_fits(config, _nodes({"CPU": 96, "GPU": 8}))
    with pytest.raises(ConfigError, match=r"cannot place learner next to rollout and judge"):
        check_fits(config, _nodes({"CPU": 96, "GPU": 4}))


def test_paper_config_uses_two_labelled_nodes():
    config = load_config(REPO / "configs/paper_gpt-oss-20b_2x8.yaml")
    learner_node, engine_node = {"CPU": 192, "GPU": 8, "learner_node": 8}, {"CPU": 192, "GPU": 8, "engine_node": 8}
    plan = check_fits(config, _nodes(learner_node, engine_node))
    assert plan == {"rollout": [1, 1], "judge": [1, 1], "learner": [0] * 8}
    # Without the custom resources the engines have nowhere to go: the message says which option.
    with pytest.raises(ConfigError) as err:
        check_fits(config, _nodes({"CPU": 192, "GPU": 8}, {"CPU": 192, "GPU": 8}))
    assert "cannot place rollout" in str(err.value) and "rollout.resources.engine_node = 1" in str(err.value)


# ---------------------------------------------------------------------------------------------
# cluster/: the launcher config validates against Ray's schema; nothing is exposed without auth
# ---------------------------------------------------------------------------------------------

def test_launcher_config_is_valid_and_locked_down():
    import jsonschema
    import ray
    import yaml

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    launcher = yaml.safe_load((REPO / "cluster/ray-cluster.gpu.yaml").read_text())
    jsonschema.validate(launcher, schema)
    head, = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    worker, = [c for c in launcher["worker_start_ray_commands"] if "ray start" in c]
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in worker
    ranges = [r["CidrIp"] for p in launcher["provider"]["security_group"]["IpPermissions"] for r in p["IpRanges"]]
    assert "0.0.0.0/0" not in ranges
    types = launcher["available_node_types"]
    paper = load_config(REPO / "configs/paper_gpt-oss-20b_2x8.yaml")
    assert set(paper.rollout.resources) <= set(types["gpu_engine"]["resources"])
    assert set(paper.learner.resources_per_rank) <= set(types["gpu_learner"]["resources"])


def test_kuberay_manifests_use_token_auth_and_cluster_ip():
    import yaml

    cluster = yaml.safe_load((REPO / "cluster/kuberay/raycluster.yaml").read_text())
    job = yaml.safe_load((REPO / "cluster/kuberay/rayjob.yaml").read_text())
    common = list(yaml.safe_load_all((REPO / "cluster/kuberay/common.yaml").read_text()))
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        groups = {g["groupName"]: g["rayStartParams"]["resources"] for g in spec["workerGroupSpecs"]}
        assert "engine_node" in groups["gpu-engine"] and "learner_node" in groups["gpu-learner"]
    assert "python -m dynalign.cli train --config configs/paper_gpt-oss-20b_2x8.yaml" in job["spec"]["entrypoint"]
    assert {d["kind"] for d in common} == {"PersistentVolumeClaim", "NetworkPolicy"}
    for path in (REPO / "cluster").rglob("*.yaml"):  # the manifests themselves, comments aside
        text = json.dumps(list(yaml.safe_load_all(path.read_text())))
        assert "LoadBalancer" not in text and "NodePort" not in text and "0.0.0.0/0" not in text, path


# ---------------------------------------------------------------------------------------------
# The fit check (simulated nodes)
# ---------------------------------------------------------------------------------------------

def test_smoke_fits_a_small_cpu_node():
    # judge.engine=shared (the default): the rollout engines judge, no judge actor is placed.
    assert check_fits(_smoke(), _nodes({"CPU": 4})) == {"rollout": [0], "learner": [0, 0]}
    assert check_fits(_smoke("judge.engine=dedicated"), _nodes({"CPU": 4})) == {
        "rollout": [0], "judge": [0], "learner": [0, 0]}


def test_gpu_request_on_cpu_cluster_is_one_line():
    with pytest.raises(ConfigError) as err:
        check_fits(_smoke("rollout.num_gpus_per_worker=1"), _nodes({"CPU": 4}))
    message = str(err.value)
    print(message)
    assert "\n" not in message
    assert message.startswith("cannot place rollout: it needs 1 engine x {CPU: 1, GPU: 1}")
    assert "the cluster has {CPU: 4, GPU: 0} on 1 node" in message
    assert "lower rollout.num_gpus_per_worker = 1.0" in message


def test_tensor_parallel_engine_stays_on_one_node():
    config = _smoke("rollout.tensor_parallel_size=2", "rollout.num_gpus_per_worker=1", "judge.kind=rule")
    check_fits(config, _nodes({"CPU": 8, "GPU": 2}))
    with pytest.raises(ConfigError, match=r"2 bundles of \{CPU: 1, GPU: 1\} on one node.*rollout.tensor_parallel_size = 2"):
        check_fits(config, _nodes({"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}))


def test_strict_spread_needs_distinct_nodes():
    config = _smoke("learner.placement_strategy=STRICT_SPREAD", "judge.kind=rule")
    assert check_fits(config, _nodes({"CPU": 2}, {"CPU": 2}))["learner"] == [0, 1]
    with pytest.raises(ConfigError, match=r"cannot place learner.*change learner.placement_strategy = STRICT_SPREAD"):
        check_fits(config, _nodes({"CPU": 8}))


def test_roles_that_fit_alone_but_not_together():
    config = _smoke("rollout.num_cpus_per_worker=2", "judge.num_cpus_per_worker=2", "judge.engine=dedicated")
    with pytest.raises(ConfigError, match=r"cannot place learner next to rollout and judge: .* leave 10.0.0.1 \{CPU: 0, GPU: 0\}.*"
                       r"lower learner.num_cpus_per_rank = 0.5 or what rollout and judge take"):
        check_fits(config, _nodes({"CPU": 4}))


def test_spread_and_pack():
    config = _smoke("rollout.num_workers=3", "rollout.placement_strategy=SPREAD")
    request = role_requests(config)[0]
    assert place_units(request, _nodes({"CPU": 4}, {"CPU": 4})) == [0, 1, 0]
    config = _smoke("rollout.num_workers=3")
    assert place_units(role_requests(config)[0], _nodes({"CPU": 4}, {"CPU": 4})) == [0, 0, 0]


def test_resource_shapes_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"learner.num_gpus_per_rank = 1.5 .*fraction below 1 or a whole number"):
        _smoke("learner.num_gpus_per_rank=1.5")
    with pytest.raises(ConfigError, match=r"rollout.resources.GPU .*custom resources only"):
        _smoke("rollout.resources={GPU: 1}")
    with pytest.raises(ConfigError, match=r"rollout.sleep_while_learning = true .*GPU engines"):
        _smoke("rollout.sleep_while_learning=true")
    with pytest.raises(ConfigError, match=r"tensor-parallel rank, at most 1"):
        _smoke("rollout.tensor_parallel_size=2", "rollout.num_gpus_per_worker=2")


def test_engines_sleep_while_the_learner_steps():
    calls = []

    class Method:
        def __init__(self, name):
            self.name = name

        def remote(self, *args):
            calls.append((self.name, args))
            return self.name

    class Engine:
        sleep, wake_up = Method("sleep"), Method("wake_up")

    class Learner:
        infos = ["rank0"]

        def train_step(self, samples):
            calls.append(("train_step", (samples,)))
            return {"loss": 1.0}

    from dynalign.driver import System
    from dynalign.weight_sync import SyncedEngines

    engines = SyncedEngines(sleep_while_learning=True, get=lambda refs: refs)
    engines.add([Engine(), Engine()], ["rollout-0", "judge-0"])
    system = System(rollout=None, judge=None, learner=Learner(), weight_sync=None, engines=engines)
    assert system.train_step("batch") == {"loss": 1.0}
    assert [c[0] for c in calls] == ["sleep", "sleep", "train_step", "wake_up", "wake_up"]
    assert calls[0][1] == (1,) and system.learner.infos == ["rank0"]


# ---------------------------------------------------------------------------------------------
# Job submission: the pure parts
# ---------------------------------------------------------------------------------------------

def test_runtime_env_and_entrypoint(tmp_path):
    from dynalign.submit import EXCLUDES, build_runtime_env, entrypoint, job_config_path, parse_env

    env = build_runtime_env(tmp_path, pip=["vllm==0.33.0"], env_vars=parse_env(["A=1", "B"], {"B": "2"}))
    assert env["working_dir"] == str(tmp_path) and env["pip"] == ["vllm==0.33.0"]
    assert env["env_vars"] == {"A": "1", "B": "2"}
    for left_out in (".git/", ".venv/", "outputs/", "checkpoints/"):
        assert left_out in EXCLUDES
    image = build_runtime_env(tmp_path, image_uri="registry/dynalign:gpu")
    assert image == {"image_uri": "registry/dynalign:gpu"}
    with pytest.raises(ConfigError, match="--image-uri with --pip"):
        build_runtime_env(tmp_path, image_uri="x", pip=["y"])
    assert entrypoint("configs/a b.yaml", ["run_dir=/tmp/x y"]) == \
        "python -m dynalign.cli train --config 'configs/a b.yaml' 'run_dir=/tmp/x y'"
    assert job_config_path(str(REPO / "configs/smoke.yaml"), REPO) == "configs/smoke.yaml"
    with pytest.raises(ConfigError, match="outside the shipped working directory"):
        job_config_path(str(tmp_path / "x.yaml"), REPO)


def test_token_never_travels_in_a_job_env():
    from dynalign.submit import parse_env

    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN=abc"):
        with pytest.raises(ConfigError, match="never goes into a job's environment"):
            parse_env([name], {"RAY_AUTH_TOKEN": "abc", "RAY_AUTH_TOKEN_PATH": "/x"})
    with pytest.raises(ConfigError, match="--env HF_TOKEN .*not set in this environment"):
        parse_env(["HF_TOKEN"], {})


def test_token_sources_in_ray_order(tmp_path):
    from dynalign.submit import check_auth_environment, token_source

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    assert token_source({}, home) is None
    (home / ".ray" / "auth_token").write_text("t0")
    assert token_source({}, home) == "~/.ray/auth_token"
    (tmp_path / "tok").write_text("t1")
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, home).startswith("RAY_AUTH_TOKEN_PATH")
    assert token_source({"RAY_AUTH_TOKEN": "t2", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, home) == "RAY_AUTH_TOKEN"
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH = .* no token in that file"):
        token_source({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)
    assert check_auth_environment("http://127.0.0.1:8265", {}) is None  # auth off: nothing sent
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE = token .* no token found"):
        check_auth_environment("http://127.0.0.1:8265", {"RAY_AUTH_MODE": "token"}, tmp_path)


def test_driver_env_leaves_job_env_vars_to_the_job(monkeypatch):
    from dynalign.submit import driver_runtime_env

    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert driver_runtime_env(env) == env
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"VLLM_LOGGING_LEVEL": "INFO"}}}))
    assert driver_runtime_env(env) == {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}


def test_submit_refuses_bad_config_before_contacting_the_cluster(capsys):
    from dynalign.cli import main

    assert main(["submit", "--address", "http://127.0.0.1:9", "--config", str(REPO / "configs/smoke.yaml"),
                 "rollout.group_sise=4"]) == 2
    assert "did you mean 'rollout.group_size'" in capsys.readouterr().err


HALF_STARTED_RAY = """
import json, socket
import psutil
from ray._private.node import Node
from ray._private.parameter import RayParams
from dynalign.placement import _stop_half_started_ray

with socket.socket() as probe:
    probe.bind(("", 0))
    port = probe.getsockname()[1]
# What ray.init(address="local") starts, without the bookkeeping it does once the raylet registers:
# the state a start that passed Ray's 30 s deadline leaves behind.
Node(RayParams(num_cpus=1, gcs_server_port=port, include_dashboard=False), head=True,
     shutdown_at_exit=False, spawn_reaper=False)
descendants = psutil.Process().children(recursive=True)
started = {c.name() for c in descendants}
_stop_half_started_ray(port)
print(json.dumps({"started": sorted(started), "alive": sum(c.is_running() for c in descendants)}))
"""


def test_a_failed_local_ray_start_leaves_no_process_behind():
    """start_local_ray tries again when Ray's start-up deadline passes (a busy machine); the
    processes of the failed try must not stay behind, holding cores and ports."""
    ray_tmp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must fit in 107 bytes
    try:
        result = subprocess.run([sys.executable, "-c", HALF_STARTED_RAY], capture_output=True, text=True,
                                timeout=120, cwd=REPO, env={**os.environ, "RAY_TMPDIR": ray_tmp})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    processes = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"gcs_server", "raylet"} <= set(processes["started"]) and len(processes["started"]) >= 4
    assert processes["alive"] == 0


# ---------------------------------------------------------------------------------------------
# A real head with token auth on loopback; `dynalign submit` through its job API
# ---------------------------------------------------------------------------------------------

def _stop_ray_processes(markers: list[str]) -> int:
    """Stop the Ray processes this test started (those whose command line names our temp dir or
    GCS port) and everything under them; never this process or its parents, never other Rays."""
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if proc.pid not in skip and any(re.search(m, cmd) for m in markers):
            roots.append(proc)
    procs = {p.pid: p for p in roots}
    for proc in roots:
        try:
            procs.update({c.pid: c for c in proc.children(recursive=True) if c.pid not in skip})
        except psutil.NoSuchProcess:
            pass
    for proc in procs.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


@pytest.fixture(scope="module")
def token_cluster(tiny_model_path, tmp_path_factory):
    """Four nodes on this machine with RAY_AUTH_MODE=token (tests/cluster_scenarios.py): a head
    serving the job API on 127.0.0.1, an engine node and two learner nodes, told apart by custom
    resources. The scenario runs the placement checks that need no training before it reports."""
    temp = Path(tempfile.mkdtemp(prefix="dyn", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
    token = secrets.token_hex(32)
    token_file = temp / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    out = temp / "cluster.json"
    # None of this process's Ray settings (its own cluster's address), except conftest's Ray Train ones.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k.startswith("RAY_TRAIN_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
               VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", VLLM_LOGGING_LEVEL="WARNING")
    log_path = tmp_path_factory.mktemp("cluster") / "cluster.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.cluster_scenarios", str(temp / "ray"), tiny_model_path,
                                 str(tmp_path_factory.mktemp("placement") / "run"), str(out)],
                                cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not out.exists():
            assert proc.poll() is None, f"the cluster scenario exited ({proc.returncode}): {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no cluster after 300 s: {log_path.read_text()[-3000:]}"
            time.sleep(1)
        cluster = {**json.loads(out.read_text()), "token": token, "token_file": token_file, "env": env}
        _wait_for_job_agent(cluster)
        print(f"token-auth cluster of 4 nodes: ready after {time.perf_counter() - started:.0f} s")
        yield cluster
    finally:
        proc.stdin.close()  # the scenario shuts its cluster down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _stop_ray_processes([re.escape(str(temp))])  # whatever outlived it
        shutil.rmtree(temp, ignore_errors=True)


def _dynalign(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynalign.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _client_env(head: dict, **changes) -> dict:
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env.update(changes)
    return env


def _wait_for_job_agent(head: dict, timeout_s: float = 90) -> None:
    """The head's job agent registers a few seconds after `ray start` returns."""
    env = _client_env(head, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head["token_file"]))
    deadline = time.monotonic() + timeout_s
    while True:
        probe = _dynalign(env, "jobs", "status", "no-such-job", "--address", head["address"])
        if "does not exist" in probe.stderr or time.monotonic() > deadline:
            return
        time.sleep(2)


@pytest.mark.slow
@pytest.mark.xdist_group("token_cluster")  # with pytest -n: on the worker that holds the cluster
def test_placement_on_four_nodes_fails_fast_and_keeps_tensor_parallel_engines_whole(token_cluster):
    """Requests the cluster cannot place fail in one line within seconds; each tensor-parallel
    engine's two bundles land on one node, the two engines on two nodes."""
    nodes = token_cluster["nodes"]
    for key, expected in (("engine_too_big", "rollout.resources.engine_node = 3"),
                          ("learner_spread", "learner.placement_strategy = STRICT_SPREAD")):
        error = token_cluster[key]["error"]
        assert error and "\n" not in error and expected in error, error
        assert token_cluster[key]["seconds"] < 10
    groups = token_cluster["tp_groups"]
    assert [len(g) for g in groups] == [1, 1] and groups[0] != groups[1]
    assert {g[0] for g in groups} == {nodes["learner_a"], nodes["learner_b"]}
    assert [e["VLLM_RAY_BUNDLE_INDICES"] for e in token_cluster["tp_options_env"]] == ["0,1", "0,1"]


@pytest.mark.slow
@pytest.mark.xdist_group("token_cluster")
@pytest.mark.timeout(1500)
def test_submit_with_token_auth_runs_the_roles_where_the_config_says(token_cluster, tiny_model_path, tmp_path):
    """`dynalign submit` to the four-node cluster with token auth: refused without the token or
    with a wrong one; with it, one iteration runs with both engines packed on the engine node and
    the learner ranks spread over the two learner nodes (STRICT_SPREAD); an impossible request
    fails fast inside its job, in one line."""
    head, nodes = token_cluster, token_cluster["nodes"]
    with_token = _client_env(head, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head["token_file"]))
    run_dir = tmp_path / "run"
    submit_args = ["submit", "--address", head["address"], "--config", "configs/smoke.yaml",
                   f"model.path={tiny_model_path}", f"run_dir={run_dir}", "judge.kind=rule", "iterations=1",
                   "logging.progress=false", "rollout.num_workers=2", "rollout.resources={engine_node: 1}",
                   "rollout.placement_strategy=PACK", "learner.resources_per_rank={learner_node: 1}",
                   "learner.placement_strategy=STRICT_SPREAD", "checkpoint.save_final_policy=false"]

    # Without the token (no RAY_AUTH_MODE, an empty HOME): the job API refuses, no job is created.
    no_home = tmp_path / "home"
    no_home.mkdir()
    refused = _dynalign(_client_env(head, HOME=str(no_home)), *submit_args)
    assert refused.returncode == 2
    assert "requires a token (HTTP 401)" in refused.stderr, refused.stderr
    wrong = _dynalign(_client_env(head, HOME=str(no_home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token"),
                      *submit_args)
    assert wrong.returncode == 2 and "refused the token (HTTP 403)" in wrong.stderr, wrong.stderr

    # With it: submitted, followed to SUCCEEDED.
    started = time.perf_counter()
    ran = _dynalign(with_token, *submit_args, "--follow", timeout=1200)
    seconds = time.perf_counter() - started
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    job_id = ran.stdout.strip().splitlines()[0]
    print(f"job {job_id}: {seconds:.0f} s from submit to SUCCEEDED")
    assert job_id.startswith("raysubmit_") and f"job {job_id} SUCCEEDED" in ran.stderr
    assert "dynalign run summary" in ran.stdout
    status = _dynalign(with_token, "jobs", "status", job_id, "--address", head["address"])
    assert status.stdout.startswith("SUCCEEDED"), status.stdout + status.stderr
    logs = _dynalign(with_token, "jobs", "logs", job_id, "--address", head["address"])
    assert logs.returncode == 0 and "dynalign run summary" in logs.stdout
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0]
    for output in (refused.stdout + refused.stderr, wrong.stdout + wrong.stderr, ran.stdout + ran.stderr, logs.stdout):
        assert head["token"] not in output
    placed = json.loads((run_dir / "placement.json").read_text())
    assert [info["node_id"] for info in placed["rollout"]] == [nodes["engines"]] * 2
    assert sorted(info["node_id"] for info in placed["learner"]) == sorted([nodes["learner_a"], nodes["learner_b"]])
    assert placed["judge"] == []  # judge.kind=rule: no judge engine

    # An impossible request fails fast with the one-line message, inside the job.
    started = time.perf_counter()
    # (Into a run_dir of its own: the first job's run is whole there, and `train` refuses to replace it.)
    bad = _dynalign(with_token, *submit_args, f"run_dir={tmp_path / 'impossible'}", "rollout.num_gpus_per_worker=1",
                    "--follow", timeout=600)
    seconds = time.perf_counter() - started
    print(f"impossible request: FAILED after {seconds:.0f} s (job start included)")
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
    line = next(x for x in (bad.stdout + bad.stderr).splitlines() if "cannot place rollout" in x)
    assert "needs 2 engines x {CPU: 1, GPU: 1, engine_node: 1} (PACK)" in line and "GPU: 0" in line, line
