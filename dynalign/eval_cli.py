"""The ``eval`` and ``report`` subcommands (parsers and commands; ``cli.py`` lists them).

    dynalign eval --policy RUN/policy --baseline outputs/tiny-model --config X [key=value ...]
                  [--prompts FILE] [--out DIR] [--run-dir DIR] [--judge-model DIR] [--tasks T1,T2]
    dynalign report RUN_DIR [--out DIR]

Only argparse here: heavy imports (Ray, vLLM, matplotlib) happen inside the commands.
"""

from __future__ import annotations

import argparse

from dynalign.config import ConfigError, load_config, writable_dir


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="policy vs baseline on held-out value prompts (win/tie/loss with intervals) and lm-eval tasks",
        description="Value alignment: the policy and the baseline answer held-out value prompts; a judge compares "
                    "every pair in both orders; win, tie and loss rates with bootstrap intervals, overall and per "
                    "pillar, plus mean rubric scores (value_alignment.json / .md). General abilities: with --tasks, "
                    "lm-evaluation-harness tasks on both models (harness.json / .md). Options: eval.* "
                    "(`dynalign config --doc`); see docs/evaluation.md.",
    )
    p.add_argument("--policy", required=True, metavar="DIR", help="the trained policy (e.g. RUN_DIR/policy)")
    p.add_argument("--baseline", metavar="DIR", default=None,
                   help="the model to compare against (e.g. the initial model); without it only --tasks run")
    p.add_argument("--config", metavar="YAML", default=None,
                   help="the run's config (value spec, judge scale, engine settings, eval.*)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override options, e.g. eval.judge=model")
    p.add_argument("--prompts", metavar="FILE", default=None, help="held-out value prompts (default: eval.prompts_path)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output directory (default: RUN_DIR/eval for RUN_DIR/policy, else outputs/eval)")
    p.add_argument("--run-dir", metavar="DIR", default=None,
                   help="the run whose training prompts are held out (default: the policy's run directory)")
    p.add_argument("--judge-model", metavar="DIR", default=None,
                   help="judge with this model (sets eval.judge=model); default eval.judge=self, the policy")
    p.add_argument("--tasks", metavar="T1,T2", default=None,
                   help="lm-evaluation-harness tasks, e.g. ifeval,gsm8k,mmlu or dynalign_exact (sets eval.tasks)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.judge_model:
        overrides += ["eval.judge=model", f"eval.judge_model_path={args.judge_model}"]
    config = load_config(args.config, overrides)
    if args.tasks:
        config.eval.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.baseline and not config.eval.tasks:
        raise ConfigError("eval: give --baseline (value alignment against it) and/or --tasks (lm-eval tasks)")
    from dynalign.evaluate import MODEL_FIX, check_eval_config, default_out_dir, run_dir_of
    from dynalign.model_fetch import check_model_dir

    policy = check_model_dir(args.policy, "--policy", MODEL_FIX)
    baseline = check_model_dir(args.baseline, "--baseline", MODEL_FIX) if args.baseline else None
    if config.eval.tasks:
        from dynalign.harness import lm_eval_version

        lm_eval_version()  # fail before any engine starts
    if baseline:
        check_eval_config(config)
    out = writable_dir("eval --out", args.out if args.out else default_out_dir(policy))
    if baseline:
        import ray

        from dynalign.evaluate import evaluate_value
        from dynalign.placement import init_ray

        started = init_ray(config, cpus_needed=3 * max(config.rollout.num_cpus_per_worker, 1.0))  # three engines
        try:
            result = evaluate_value(config, policy, baseline, out_dir=out, prompts_path=args.prompts,
                                    run_dir=args.run_dir)
        finally:
            if started:
                ray.shutdown()
        print((out / "value_alignment.md").read_text())
        overall = result["overall"]
        print(f"value alignment: win {overall['win']['rate']:.3f}, tie {overall['tie']['rate']:.3f}, "
              f"loss {overall['loss']['rate']:.3f} over {overall['n']} prompts -> {out / 'value_alignment.json'}")
    if config.eval.tasks:
        from dynalign.harness import run_harness

        models = {"policy": policy, **({"baseline": baseline} if baseline else {})}
        run_harness(config, models, out)
        print((out / "harness.md").read_text())
    run_dir = run_dir_of(policy)
    if run_dir is not None and out.resolve() == (run_dir / "eval").resolve():
        from dynalign.report import write_report_safely

        write_report_safely(run_dir)
    return 0


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="an HTML report of a run: reward, scores, lengths, KL/clipping, judge, prompts, evaluations",
        description="Write RUN_DIR/report/index.html with PNG plots and tables from metrics.jsonl, samples.jsonl, "
                    "the data report (generated prompts) and RUN_DIR/eval/*.json. `dynalign train` writes it at "
                    "the end of every run.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (run_dir of `train`)")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default: RUN_DIR/report)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from dynalign.report import write_report

    path = write_report(args.run_dir, args.out)
    print(f"report: {path}")
    return 0
