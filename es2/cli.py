"""The `es2` command line. Each subcommand calls one stage function; DVC and the Prefect flow call the same ones.

Run `es2 COMMAND --help` for the options and an example of each command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from es2.errors import ES2Error

EXAMPLES = {
    "model prepare": "es2 model prepare            # dequantize the embedded SmolLM2 GGUF into the cache (once)",
    "data import": "es2 data import advbench harmful_behaviors.csv --output data/extra/advbench.jsonl\n"
                   "  es2 data import csv my.csv --label harmless --columns prompt=question,category=topic "
                   "--output out.jsonl",
    "validate": "es2 validate                 # the files named in params.yaml (data section)\n"
                "  es2 validate --harmful new_harmful.jsonl --harmless new_harmless.jsonl",
    "pairs": "es2 pairs --set pairs.strategy=random --set pairs.neighbours=4",
    "align": "es2 align                    # refusal warm-start of the default model (a few minutes on CPU)",
    "train": "es2 train --set train.method=circuit_breakers --set train.steps=100\n"
             "  es2 train --resume             # continue from the last checkpoint after an interruption\n"
             "  es2 train --set train.num_processes=2   # through accelerate/torchrun (CPU: gloo)",
    "run": "es2 run                      # the whole Prefect flow locally: dvc stages, register, promote\n"
           "  es2 run --set train.kl_weight=0.5   # overrides become a DVC experiment",
    "serve": "es2 serve                    # serve the nightly deployment (needs PREFECT_API_URL of a server)",
    "register": "es2 register                 # log the pipeline run to MLflow; new model version, alias challenger",
    "promote": "es2 promote                  # move alias champion to the challenger if the gates pass",
    "evaluate": "es2 evaluate                 # the trained adapter vs the model training started from\n"
                "  es2 evaluate --model artifacts/train/adapter --harmful harmful_behaviors.csv "
                "--limit 20 --attacks direct,prefill --baseline smollm2-135m-instruct --out /tmp/eval",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="es2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="pipeline: validate -> pairs -> align -> train (dvc repro runs them in order; see README)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter for this run, e.g. --set pairs.seed=3 (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent, name, full_name, help_text, **kw):
        return parent.add_parser(name, help=help_text, description=help_text, parents=[common],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"example:\n  {EXAMPLES[full_name]}", **kw)

    model = sub.add_parser("model", help="manage the base model").add_subparsers(dest="action", required=True)
    prep = add(model, "prepare", "model prepare", "convert the embedded default model to safetensors in the cache")
    prep.add_argument("--force", action="store_true", help="rebuild even if the cache holds it")

    data = sub.add_parser("data", help="import data sets").add_subparsers(dest="action", required=True)
    imp = add(data, "import", "data import", "convert a benchmark file into normalised JSONL records")
    imp.add_argument("format", help="advbench, harmbench, jailbreakbench, xstest, alpaca, jsonl or csv")
    imp.add_argument("input", type=Path)
    imp.add_argument("--label", choices=["harmful", "harmless"], help="label for formats without one")
    imp.add_argument("--output", type=Path, required=True)
    imp.add_argument("--columns", help="field=column mapping, e.g. prompt=question,category=topic")
    imp.add_argument("--source", help="value of the source field (default: the format name)")

    val = add(sub, "validate", "validate", "check data quality with a Great Expectations suite")
    val.add_argument("--harmful", type=Path, help="harmful file (default: data.train_harmful)")
    val.add_argument("--harmless", type=Path, help="harmless file (default: data.train_harmless)")
    val.add_argument("--out", type=Path, default=Path("artifacts/validation"), help="report and Data Docs folder")

    pairs = add(sub, "pairs", "pairs", "pair each harmful prompt with harmless ones (hard negatives)")
    pairs.add_argument("--out", type=Path, default=Path("artifacts/pairs"))

    align = add(sub, "align", "align", "refusal warm-start: LoRA SFT to refuse, merged into a new base")
    align.add_argument("--out", type=Path, default=Path("artifacts/align"))
    align.add_argument("--pairs", type=Path, default=Path("artifacts/pairs"), help="pairs folder")

    train = add(sub, "train", "train", "fine-tune with ES2 (or a baseline: train.method) on the pairs")
    train.add_argument("--out", type=Path, default=Path("artifacts/train"))
    train.add_argument("--pairs", type=Path, default=Path("artifacts/pairs"), help="pairs folder")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT")

    ev = add(sub, "evaluate", "evaluate", "attack, judge and measure a model (any model, any prompt file)")
    ev.add_argument("--model", help="model folder, HF id, adapter folder, or registered model "
                                    "models:/NAME@ALIAS or models:/NAME/VERSION (default: evaluate.model)")
    ev.add_argument("--harmful", help="harmful prompts: normalised JSONL or an importable CSV/JSON")
    ev.add_argument("--benign", help="benign prompts (default: data.eval_harmless)")
    ev.add_argument("--baseline", default="params", help="model to compare with; 'none' for no comparison")
    ev.add_argument("--attacks", help="comma list of: direct,template,prefill,injection,scav,repe,softprompt,gcg")
    ev.add_argument("--limit", type=int, help="prompts per set")
    ev.add_argument("--compare", help="comma list of further models shown side by side (default: evaluate.compare)")
    ev.add_argument("--out", type=Path, default=Path("artifacts/evaluate"))

    run = add(sub, "run", "run", "run the whole pipeline as a Prefect flow (stages through DVC, then registry)")
    run.add_argument("--no-register", action="store_true", help="stop after the DVC stages")
    add(sub, "serve", "serve", "serve the scheduled Prefect deployment es2-pipeline/nightly from this process")
    add(sub, "register", "register", "log the pipeline run and register the model (alias challenger)")
    add(sub, "promote", "promote", "promote the challenger to champion when every gate passes")
    return parser


def _run(args, argv: list[str] | None = None) -> int:
    from es2.config import load_params

    if args.command == "model":
        from es2.modeling import prepare_default_model

        print(f"default model ready: {prepare_default_model(force=args.force)}")
        return 0
    if args.command == "data":
        from es2.data.importers import import_records, parse_column_mapping, write_records

        columns = parse_column_mapping(args.columns) if args.columns else None
        records = import_records(args.format, args.input, args.label, columns,
                                 args.source)
        write_records(records, args.output)
        print(f"wrote {len(records)} records to {args.output}")
        return 0
    params = load_params(args.params, tuple(args.overrides))
    if args.command == "validate":
        from es2.stages.validate import run_validate

        report = run_validate(params, args.out, args.harmful, args.harmless)
        print(report.summary())
        return 0 if report.success else 1
    if args.command == "pairs":
        from es2.runtime import set_threads
        from es2.stages.pairs import run_pairs

        set_threads()
        stats = run_pairs(params, args.out)
        for split, s in stats["splits"].items():
            print(f"{split:5s}: {s['pairs']} pairs ({s['harmful']} harmful x {stats['neighbours']}), "
                  f"median similarity {s['similarity']['q50']:.3f}")
        print(f"wrote {args.out}/{{train,val,eval}}.jsonl, stats.json, similarity.png")
        return 0
    if args.command == "align":
        from es2.runtime import set_threads
        from es2.stages.align import run_align

        set_threads()
        metrics = run_align(params, args.out, args.pairs)
        if metrics["enabled"]:
            for when in ("before", "after"):
                m = metrics[when]
                print(f"{when:6s}: refusal on held-out harmful {m['refusal_jbb']['rate']:.0%} (JBB) "
                      f"{m['refusal_qi']['rate']:.0%} (Qi); over-refusal on harmless "
                      f"{m['over_refusal_jbb']['rate']:.0%} (JBB) {m['over_refusal_qi']['rate']:.0%} (Qi)")
        print(f"wrote {args.out}/metrics.json" + (" and adapter/" if metrics["enabled"] else " (align disabled)"))
        return 0
    if args.command == "train":
        from es2.launch import needs_launcher, relaunch

        if needs_launcher(params.train):
            return relaunch(params.train, sys.argv[1:] if argv is None else argv)
        from es2.runtime import set_threads
        from es2.stages.train import run_train

        set_threads()
        metrics = run_train(params, args.out, args.pairs, args.resume)
        if metrics:
            print(f"held-out d' {metrics['heldout_dprime_base']:.3f} -> {metrics['heldout_dprime_trained']:.3f} "
                  f"(x{metrics['heldout_dprime_ratio']:.2f}), hidden norm change "
                  f"{metrics['heldout_norm_change']:+.1%}, KL on harmless {metrics['heldout_kl_harmless']:.4f} nats/token")
            print(f"wrote {args.out}/adapter, metrics.json, curve.csv, curve.png")
        return 0
    if args.command == "evaluate":
        from es2.runtime import set_threads
        from es2.stages.evaluate import run_evaluate

        set_threads()
        attacks = args.attacks.split(",") if args.attacks else None
        if attacks:
            params = load_params(args.params, (*args.overrides, f"evaluate.attacks={attacks}"))
        baseline = None if args.baseline == "none" else args.baseline
        metrics = run_evaluate(params, args.out, args.model, baseline, args.harmful, args.benign, None, args.limit,
                               args.compare.split(",") if args.compare else None)
        from es2.report import summary_text

        print(summary_text(metrics))
        print(f"wrote {args.out}/report.html, metrics.json, examples.jsonl")
        return 0
    if args.command in ("run", "serve"):
        from es2.runtime import prefect_environment

        prefect_environment()
        if args.command == "serve":
            from flows.serve import main as serve

            serve(repo=".")
            return 0
        from flows.pipeline import pipeline

        overrides = dict(o.split("=", 1) for o in args.overrides) or None
        state = pipeline(repo=".", register=not args.no_register, params_overrides=overrides, return_state=True)
        print(f"flow run {state.name}: {state.message or ''}")
        return 0 if state.is_completed() else 1
    if args.command == "register":
        from es2.stages.registry import run_register

        result = run_register(params, Path("artifacts"))
        print(f"run {result['run_id']}: registered {result['model_name']} version {result['version']} "
              f"({result['model_uri']}, tracking {result['tracking_uri']})")
        return 0
    if args.command == "promote":
        from es2.stages.registry import run_promote

        decision = run_promote(params)
        print(decision.table_text())
        print("promoted: challenger is now champion" if decision.promoted else "not promoted: champion unchanged")
        return 0  # a rejected challenger is a normal outcome, not a failure
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args, argv)
    except ES2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
