"""Checkpoints: everything a run needs to continue exactly where it stood.

Layout: ``run_dir/checkpoints/iter_000003/`` holds ``learner/`` (DeepSpeed: model, optimizer,
scheduler), ``policy/`` (Hugging Face format, in ``checkpoint.policy_dtype``; with LoRA
``adapter/`` instead, in PEFT format), ``state.json`` (iteration, prompt stream position,
judge call counter; every other random choice is seeded from the seed and the iteration),
with ``rollout.max_staleness >= 1`` ``rollouts_ahead.jsonl`` (the next iteration's groups, already
generated and judged) and ``manifest.json`` (written last: a directory without it is not a checkpoint; it records each
file's size and sha256, checked before a resume starts anything). The directory is written under
a temporary name and renamed into place, so a crash or a full disk never leaves a half-written
checkpoint, and the previous one stays intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from dynalign.files import atomic_directory, atomic_write_text, fsync_directory, write_jsonl

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PREFIX = "iter_"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: str | Path, iteration: int, learner, state: dict, keep_last: int, adapter: bool = False,
         records: dict[str, list] | None = None) -> Path:
    """Write the checkpoint of a completed ``iteration``; returns its directory. ``adapter``: a LoRA
    run, whose checkpoint keeps the adapter, not a merged copy of the whole model. ``records``:
    JSON-lines files to keep with it, by name (the groups produced ahead)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{iteration:06d}"
    staging = root / f".tmp-{PREFIX}{iteration:06d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        learner.save_checkpoint(staging / "learner")
        if adapter:
            learner.save_adapter(staging / "adapter")
        else:
            learner.save_policy(staging / "policy")  # checkpoint.policy_dtype; learner/ keeps the float32 master weights
        write_json(staging / "state.json", {**state, "iteration": iteration})
        for name, rows in (records or {}).items():
            write_jsonl(staging / name, rows)
        files = {str(p.relative_to(staging)): file_record(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        write_json(staging / MANIFEST, {"iteration": iteration, "created": time.time(), "files": files})
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_directory(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    prune(root, keep_last)
    return final


def file_record(path: Path) -> dict:
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` (a file missing, cut short or changed), or None."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path / MANIFEST} cannot be read"
    if isinstance(files, list):  # written before checksums were recorded: presence only
        files = {name: None for name in files}
    for name, record in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if record is None:
            continue
        if file.stat().st_size != record["size"]:
            return f"{file} is {file.stat().st_size} bytes, the manifest says {record['size']}"
        if file_record(file)["sha256"] != record["sha256"]:
            return f"{file} does not match its checksum"
    return None


def write_json(path: Path, payload: dict) -> None:
    """Atomic JSON write: a temp file, fsync, rename."""
    atomic_write_text(path, json.dumps(payload, indent=2))


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / MANIFEST).is_file())


def prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def resolve(run_dir: str | Path, resume: str) -> Path:
    """``latest`` or a path -> a complete checkpoint directory, or a one-line error."""
    from dynalign.config import ConfigError

    found = complete_checkpoints(checkpoint_root(run_dir))
    if resume == "latest":
        if not found:
            raise ConfigError(f"--resume latest: no complete checkpoint under {checkpoint_root(run_dir)}; "
                              "start without --resume")
        for candidate in reversed(found):  # the newest intact one
            problem = damage(candidate)
            if problem is None:
                return candidate
            log.warning("--resume latest: skipping damaged checkpoint %s (%s)", candidate.name, problem)
        raise ConfigError(f"--resume latest: every checkpoint under {checkpoint_root(run_dir)} is damaged; "
                          "start without --resume (or with --overwrite)")
    path = Path(resume)
    if not (path / MANIFEST).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint (no {MANIFEST}); "
                          f"use --resume latest or a directory under {checkpoint_root(run_dir)}")
    problem = damage(path)
    if problem is not None:
        earlier = [p for p in found if p.name < path.name and damage(p) is None]
        fix = f"resume from an earlier checkpoint: --resume {earlier[-1]}" if earlier else "start without --resume"
        raise ConfigError(f"--resume {resume}: damaged checkpoint: {problem}; {fix}")
    return path


def load_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


# -- the final policy (Hugging Face format) ----------------------------------------------------------

def policy_dtype(option: str, model_path: str) -> str:
    """The dtype name the final policy is saved in: ``checkpoint.policy_dtype``, or for ``auto``
    the one the model's own config.json names (``dtype``, formerly ``torch_dtype``), float32 when
    it names no floating dtype."""
    if option != "auto":
        return option
    from transformers import PretrainedConfig

    values, _ = PretrainedConfig.get_config_dict(model_path)
    name = str(values.get("dtype") or values.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def cast_floating(state: dict, dtype) -> dict:
    """``state`` with its floating-point tensors in ``dtype`` (integer buffers stay as they are)."""
    return {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}


def write_policy(model, tokenizer, buckets: Iterable[dict], num_buckets: int,
                 path: str | os.PathLike, dtype_name: str) -> None:
    """The weights in ``buckets`` ({name: tensor} dicts, consumed one at a time) in Hugging Face
    format under ``path``: one safetensors shard per bucket, written as it arrives so that only one
    bucket is in memory, an index, ``model``'s config naming ``dtype_name`` (so transformers and vLLM
    load it as such), its generation config and the tokenizer. The directory replaces ``path`` atomically."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    weight_map, total_bytes = {}, 0
    with atomic_directory(path) as staging:
        for index, bucket in enumerate(buckets, start=1):
            shard = f"model-{index:05d}-of-{num_buckets:05d}.safetensors"
            bucket = cast_floating(bucket, dtype)
            save_file(bucket, str(staging / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(bucket, shard))
            total_bytes += sum(t.numel() * t.element_size() for t in bucket.values())
            del bucket
        if num_buckets == 1:  # the name transformers gives an unsharded model
            os.replace(staging / shard, staging / "model.safetensors")
        else:
            atomic_write_text(staging / "model.safetensors.index.json", json.dumps(
                {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        saved_as = model.config.dtype  # the live module's dtype (float32)
        model.config.dtype = dtype_name
        try:
            model.config.save_pretrained(staging)
        finally:
            model.config.dtype = saved_as
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
