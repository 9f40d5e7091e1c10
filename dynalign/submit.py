"""Run on a Ray cluster: submit a training run as a Ray job, then follow, query or stop it.

    dynalign submit --address http://127.0.0.1:8265 --config configs/gpu_8x.yaml [key=value ...] [--follow]
    dynalign jobs status|logs|stop JOB_ID --address http://127.0.0.1:8265

A job is ``python -m dynalign.cli train --config X key=value ...`` run on the cluster's head node,
in a copy of the working directory (``outputs/``, ``.venv/``, checkpoints and ``.git`` left out),
with the runtime environment built here: Python packages (``--pip``) or a container image
(``--image-uri``), and environment variables (``--env``). It is equivalent to

    ray job submit --address URL --working-dir . -- python -m dynalign.cli train --config X ...

Security: with Ray token authentication on (``RAY_AUTH_MODE=token`` on the cluster), the job API
needs the cluster's token. Ray reads it, in this order, from ``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``, and sends it only when ``RAY_AUTH_MODE=token`` is
set here too (an explicit address never turns it on by itself). The token is never an argument,
never put in a job's environment and never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from dynalign.config import ConfigError, load_config

log = logging.getLogger(__name__)

# What a job's working directory leaves out (gitignore syntax, relative to the directory).
EXCLUDES = [".git/", ".venv/", "outputs/", "checkpoints/", "**/checkpoints/", "**/__pycache__/", "*.egg-info/",
            ".pytest_cache/", ".ruff_cache/", "*.safetensors", "*.bin", "*.pt"]
TOKEN_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(ConfigError):
    """The cluster refused or cannot be reached; one line for the user (the CLI prints it)."""


# ---------------------------------------------------------------------------------------------
# Token authentication (what Ray itself reads; we only check it is there)
# ---------------------------------------------------------------------------------------------

def token_source(environ: dict | None = None, home: Path | None = None) -> str | None:
    """Where Ray will read the token from (a description, never the token), or None."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        if not _nonempty_file(Path(path).expanduser()):
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH = '{path}' (environment): no token in that file; point it at the "
                              "file holding the cluster's token")
        return f"RAY_AUTH_TOKEN_PATH ({path})"
    default = (home or Path.home()) / ".ray" / "auth_token"
    return "~/.ray/auth_token" if _nonempty_file(default) else None


def _nonempty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def check_auth_environment(address: str, environ: dict | None = None, home: Path | None = None) -> str | None:
    """Before talking to the cluster: a token must be findable when RAY_AUTH_MODE=token; warn when
    it would cross a network in clear text. Returns the token's source (or None: auth off)."""
    environ = os.environ if environ is None else environ
    mode = environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode != "token":
        return None
    source = token_source(environ, home)
    if source is None:
        raise ConfigError("RAY_AUTH_MODE = token (environment) but no token found: set RAY_AUTH_TOKEN, or "
                          "RAY_AUTH_TOKEN_PATH to a file holding it, or write it to ~/.ray/auth_token "
                          "(never pass it on the command line)")
    url = urlparse(address)
    if url.scheme == "http" and url.hostname not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the token goes unencrypted to %s; reach the dashboard through an SSH tunnel or "
                    "`kubectl port-forward` and submit to http://127.0.0.1:8265 (cluster/README.md)", url.hostname)
    return source


def _cluster_error(err: Exception, address: str) -> ClusterError:
    text = str(err)
    if "Authentication required" in text or "401" in text.split("\n")[0]:
        return ClusterError(f"the Ray cluster at {address} requires a token (HTTP 401): export RAY_AUTH_MODE=token "
                            "and provide the cluster's token in RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, "
                            "or ~/.ray/auth_token")
    if "Authentication failed" in text or "403" in text.split("\n")[0]:
        return ClusterError(f"the Ray cluster at {address} refused the token (HTTP 403): "
                            f"{token_source() or 'the token here'} does not hold the cluster's token")
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return ClusterError(f"Ray cluster at {address}: {first}")


def connect(address: str):
    """A ``JobSubmissionClient`` for the cluster's dashboard address (http://HOST:8265)."""
    check_auth_environment(address)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # ConnectionError, AuthenticationError, ...
        raise _cluster_error(err, address) from None


# ---------------------------------------------------------------------------------------------
# The job: entrypoint and runtime environment
# ---------------------------------------------------------------------------------------------

def parse_env(items: list[str], environ: dict | None = None) -> dict[str, str]:
    """``KEY=VALUE`` pairs, or ``KEY`` alone to copy the value from this environment (keeps secrets
    off the command line). The Ray token is refused: the cluster's nodes hold it already."""
    environ = os.environ if environ is None else environ
    env = {}
    for item in items:
        key, has_value, value = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"--env '{item}' (command line): expected KEY=VALUE or KEY")
        if key in TOKEN_VARIABLES or key == "RAY_AUTH_MODE":
            raise ConfigError(f"--env {key} (command line): the Ray token never goes into a job's environment (it "
                              "would be stored with the job); the cluster's nodes already hold it")
        if not has_value:
            if key not in environ:
                raise ConfigError(f"--env {key} (command line): not set in this environment; give --env {key}=VALUE")
            value = environ[key]
        env[key] = value
    return env


def build_runtime_env(working_dir: str | Path | None, *, pip: list[str] | None = None,
                      image_uri: str | None = None, env_vars: dict[str, str] | None = None,
                      excludes: list[str] | None = None) -> dict:
    """The job's runtime environment (a plain dict, as Ray's job API takes it)."""
    if image_uri and pip:
        raise ConfigError("--image-uri with --pip (command line): Ray runs a container image as it is; install the "
                          "packages into the image instead")
    runtime_env: dict = {}
    if image_uri:
        runtime_env["image_uri"] = image_uri  # the project and its dependencies live in the image
    elif working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
        runtime_env["excludes"] = EXCLUDES + list(excludes or [])
    if pip:
        runtime_env["pip"] = list(pip)
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env


def entrypoint(config_path: str | None, overrides: list[str], python: str = "python") -> str:
    command = [python, "-m", "dynalign.cli", "train"]
    if config_path is not None:
        command += ["--config", config_path]
    return shlex.join(command + list(overrides))


def job_config_path(config: str | None, working_dir: Path | None) -> str | None:
    """The config file as the job sees it: relative to the shipped working directory."""
    if config is None or working_dir is None:
        return config
    path = Path(config)
    absolute = path if path.is_absolute() else Path.cwd() / path
    try:
        return str(absolute.resolve().relative_to(working_dir.resolve()))
    except ValueError:
        raise ConfigError(f"--config {config} (command line): outside the shipped working directory "
                          f"{working_dir}; move it there or pass --working-dir") from None


def driver_runtime_env(env: dict) -> dict:
    """The driver's ``ray.init`` runtime env inside a Ray job: Ray refuses env vars that the job's
    own runtime env sets too, so those are left to the job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return env
    try:
        job_vars = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except ValueError:
        return env
    return {**env, "env_vars": {k: v for k, v in env.get("env_vars", {}).items() if k not in job_vars}}


def submit(address: str, config: str | None, overrides: list[str], *, working_dir: str | None = ".",
           pip: list[str] | None = None, image_uri: str | None = None, env: list[str] = (),
           python: str = "python", submission_id: str | None = None, excludes: list[str] | None = None,
           entrypoint_num_cpus: float | None = None) -> tuple[object, str]:
    """Validate the config here, then submit; returns (client, job id)."""
    load_config(config, overrides)  # a typo fails now, not minutes later on the cluster
    shipped = None if (image_uri or working_dir is None) else Path(working_dir)
    if shipped is not None and not shipped.is_dir():
        raise ConfigError(f"--working-dir {working_dir} (command line): not a directory")
    runtime_env = build_runtime_env(shipped.resolve() if shipped else None, pip=pip, image_uri=image_uri,
                                    env_vars=parse_env(list(env)), excludes=excludes)
    command = entrypoint(job_config_path(config, shipped), overrides, python)
    client = connect(address)
    try:
        job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=submission_id,
                                   metadata={"submitted_by": "dynalign submit", "config": str(config)},
                                   entrypoint_num_cpus=entrypoint_num_cpus)
    except Exception as err:
        raise _cluster_error(err, address) from None
    return client, job_id


def follow(client, job_id: str, out=None, poll_s: float = 1.0) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    import asyncio

    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL:  # the log stream can close just before the status flips
        time.sleep(poll_s)
        status = str(client.get_job_status(job_id))
    return status.split(".")[-1]


def wait(client, job_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------
# Command line: `dynalign submit`, `dynalign jobs`
# ---------------------------------------------------------------------------------------------

def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, metavar="URL",
                   help="the cluster's dashboard (job API) address, e.g. http://127.0.0.1:8265 through an SSH "
                        "tunnel or kubectl port-forward (default: $RAY_ADDRESS when it is an http URL)")


def _address(args: argparse.Namespace) -> str:
    address = args.address or os.environ.get("RAY_ADDRESS", "")
    if not address.startswith(("http://", "https://")):
        raise ConfigError("--address (command line): give the cluster's dashboard URL, e.g. "
                          "--address http://127.0.0.1:8265, or set RAY_ADDRESS to it")
    return address.rstrip("/")


def add_submit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a training run to a Ray cluster as a Ray job (token auth from the environment)",
        description="Validate the config here, then run `dynalign train --config X key=value ...` on the cluster "
                    "as a Ray job, with the working directory shipped. Prints the job id. The Ray token comes "
                    "from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token when RAY_AUTH_MODE=token, "
                    "never from the command line.",
    )
    _address_arg(p)
    p.add_argument("--config", metavar="YAML", default=None, help="run config (inside the working directory)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, passed to the job")
    p.add_argument("--working-dir", default=".", metavar="DIR",
                   help="directory shipped to the cluster as the job's working directory (default: .); "
                        "outputs/, .venv/, checkpoints and .git are left out")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="also leave out these paths (gitignore syntax; repeatable)")
    p.add_argument("--pip", action="append", default=[], metavar="REQ",
                   help="Python requirement installed for the job (repeatable), e.g. --pip vllm==0.33.0; or a "
                        "requirements file path")
    p.add_argument("--image-uri", default=None, metavar="IMAGE",
                   help="run the job in this container image (holding the project and its dependencies; "
                        "replaces --working-dir and --pip)")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="environment variable for the job (repeatable); KEY alone copies its value from here")
    p.add_argument("--python", default="python", metavar="EXE",
                   help="the cluster's Python that runs `-m dynalign.cli train` (default: python)")
    p.add_argument("--submission-id", default=None, metavar="ID", help="job id to use (default: Ray picks one)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 if it succeeded")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    address = _address(args)
    pip = args.pip
    if len(pip) == 1 and Path(pip[0]).is_file():  # a requirements file
        pip = [line.strip() for line in Path(pip[0]).read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    client, job_id = submit(address, args.config, args.overrides, working_dir=args.working_dir, pip=pip,
                            image_uri=args.image_uri, env=args.env, python=args.python,
                            submission_id=args.submission_id, excludes=args.exclude)
    print(job_id, flush=True)
    print(f"dynalign: submitted job {job_id} to {address}; follow it with "
          f"`dynalign jobs logs {job_id} --follow --address {address}`", file=sys.stderr)
    if not args.follow:
        return 0
    return _follow_and_report(client, job_id, address)


def _follow_and_report(client, job_id: str, address: str) -> int:
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\ndynalign: stopped following; job {job_id} keeps running "
              f"(`dynalign jobs stop {job_id} --address {address}` ends it)", file=sys.stderr)
        return 130
    print(f"dynalign: job {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def add_jobs_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="status, logs or stop of a Ray job on a cluster",
                       description="Query or stop a job submitted with `dynalign submit` (or `ray job submit`).")
    actions = p.add_subparsers(dest="action", metavar="<action>", required=True)
    for name, help_text in (("status", "print the job's status (and message)"),
                            ("logs", "print the job's logs (--follow: stream until it ends)"),
                            ("stop", "stop the job")):
        a = actions.add_parser(name, help=help_text, description=help_text)
        a.add_argument("job_id", metavar="ID")
        _address_arg(a)
        if name == "logs":
            a.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
        a.set_defaults(func=cmd_jobs)


def cmd_jobs(args: argparse.Namespace) -> int:
    address = _address(args)
    client = connect(address)
    try:
        if args.action == "status":
            info = client.get_job_info(args.job_id)
            status = str(info.status).split(".")[-1]
            message = (info.message or "").strip().splitlines()
            print(status + (f": {message[0]}" if message else ""))
            return 0
        if args.action == "logs":
            if args.follow:
                return _follow_and_report(client, args.job_id, address)
            sys.stdout.write(client.get_job_logs(args.job_id))
            return 0
        stopped = client.stop_job(args.job_id)
        print(f"job {args.job_id}: {'stop requested' if stopped else 'already ended'}")
        return 0
    except ClusterError:
        raise
    except Exception as err:  # unknown job id, connection lost, ...
        raise _cluster_error(err, address) from None
