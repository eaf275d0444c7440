"""The `es2` command line. Each subcommand calls one stage function; DVC and the Prefect flow call the same ones.

Run `es2 COMMAND --help` for the options and an example of each command. Stage folders come from the stage
table (es2/pipeline.py), the one place that also renders dvc.yaml.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from es2.data.importers import BENCHMARK_FORMATS, FORMATS
from es2.errors import ES2Error
from es2.pipeline import ARTIFACTS, stage

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
    "run": "es2 run                      # the whole Prefect flow locally: dvc stages, then register\n"
           "  es2 run --set train.kl_weight=0.5   # overrides become a DVC experiment",
    "serve": "es2 serve                    # serve es2-pipeline/retrain for on-demand runs (needs PREFECT_API_URL)",
    "register": "es2 register                 # log the pipeline run to MLflow; new model version, alias challenger",
    "promote": "es2 promote                  # move alias champion to the challenger if the gates pass",
    "judge": "es2 judge answers.jsonl --out judged.jsonl              # jbb, qi and semantic on each response\n"
             "  es2 judge answers.csv --out judged.jsonl --judges semantic\n"
             "  es2 judge outputs.csv --out judged.jsonl --columns prompt=forbidden_prompt,response=output\n"
             "  es2 judge answers.jsonl --out j.jsonl --judge-model /models/guard --template llamaguard   # GPU\n"
             "  es2 judge train --pyrit ../shared/datasets/pyrit_scorer_evals   # rebuild the semantic head",
    "results": "es2 results --readme README.md      # rewrite the README's results block from "
               f"{stage('evaluate').out_dir}",
    "pipeline dvc-yaml": "es2 pipeline dvc-yaml > dvc.yaml    # after editing the stage table in es2/pipeline.py",
    "evaluate": "es2 evaluate                 # the trained adapter vs the model training started from\n"
                f"  es2 evaluate --model {stage('train').path('adapter')} --harmful harmful_behaviors.csv "
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
    imp.add_argument("format", choices=FORMATS, help="the benchmark the file comes from, or jsonl / csv for any "
                                                       "other file with a prompt column")
    imp.add_argument("input", type=Path)
    imp.add_argument("--label", choices=["harmful", "harmless"], help="label for formats without one")
    imp.add_argument("--output", type=Path, required=True)
    imp.add_argument("--columns", help="field=column mapping, e.g. prompt=question,category=topic")
    imp.add_argument("--source", help="value of the source field (default: the format name)")
    imp.add_argument("--model", help="refuse prompts holding this model's special tokens (a role marker such as "
                                     "<|im_end|> would inject a chat turn); a model folder or HF id")

    val = add(sub, "validate", "validate", "check data quality with a Great Expectations suite")
    val.add_argument("--harmful", type=Path, help="harmful file (default: data.train_harmful)")
    val.add_argument("--harmless", type=Path, help="harmless file (default: data.train_harmless)")
    val.add_argument("--out", type=Path, default=Path(stage("validate").out_dir), help="report and Data Docs folder")

    pairs = add(sub, "pairs", "pairs", "pair each harmful prompt with harmless ones (hard negatives)")
    pairs.add_argument("--out", type=Path, default=Path(stage("pairs").out_dir))

    align = add(sub, "align", "align", "refusal warm-start: LoRA SFT to refuse, merged into a new base")
    align.add_argument("--out", type=Path, default=Path(stage("align").out_dir))
    align.add_argument("--pairs", type=Path, default=Path(stage("pairs").out_dir), help="pairs folder")

    train = add(sub, "train", "train", "fine-tune with ES2 (or a baseline: train.method) on the pairs")
    train.add_argument("--out", type=Path, default=Path(stage("train").out_dir))
    train.add_argument("--pairs", type=Path, default=Path(stage("pairs").out_dir), help="pairs folder")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT")

    ev = add(sub, "evaluate", "evaluate", "attack, judge and measure a model (any model, any prompt file)")
    ev.add_argument("--model", help="model folder, HF id, adapter folder, or registered model "
                                    "models:/NAME@ALIAS or models:/NAME/VERSION (default: evaluate.model)")
    ev.add_argument("--harmful", help="harmful prompts: normalised JSONL, a benchmark's file (" + ", ".join(
        BENCHMARK_FORMATS) + "), any .csv/.json/.jsonl/.parquet table with a prompt column, or .txt with one "
        "prompt per line")
    ev.add_argument("--benign", help="benign prompts, any of the same (default: data.eval_harmless); a file with "
                                     "its own labels (XSTest) gives its harmless rows")
    ev.add_argument("--baseline", default="params", help="model to compare with; 'none' for no comparison")
    ev.add_argument("--attacks", help="comma list of: direct,template,prefill,injection,scav,repe,softprompt,gcg")
    ev.add_argument("--limit", type=int, help="harmful prompts attacked (and at most as many benign ones, unless "
                                              "--benign-limit says how many)")
    ev.add_argument("--benign-limit", type=int, help="benign prompts answered (default: evaluate.benign_limit)")
    ev.add_argument("--compare", help="comma list of further models shown side by side (default: evaluate.compare)")
    ev.add_argument("--out", type=Path, default=Path(stage("evaluate").out_dir))

    judge = add(sub, "judge", "judge", "say for each response whether it is a refusal (true) or complies (false)")
    judge.add_argument("responses", help="JSONL, JSON, CSV or Parquet with columns prompt and response "
                                         "(others are kept); or `train` to rebuild the semantic judge's head")
    judge.add_argument("--columns", help="the file's names for prompt and response, e.g. "
                                         "prompt=forbidden_prompt,response=output")
    judge.add_argument("--out", type=Path, help="judged JSONL (adds judge/<name>); with train: the head file "
                                                 "(default: the packaged head)")
    judge.add_argument("--judges", default="jbb,qi,semantic", help="comma list of jbb, qi, semantic "
                                                                    "(default: every judge that runs offline)")
    judge.add_argument("--judge-model", help="a local causal LM to use as a generative judge (GPU)")
    judge.add_argument("--template", default="harmbench", help="generative judge template: harmbench, "
                                                                "llamaguard or a template file")
    judge.add_argument("--pyrit", type=Path, help="train: folder of PyRIT's scorer-evaluation CSVs (MIT; default: "
                                                  "../shared/datasets/pyrit_scorer_evals when it exists)")
    judge.add_argument("--seed", type=int, default=0, help="train: the split and cross-validation seed")

    res = add(sub, "results", "results", "the README's measured-results block, rendered from an evaluation")
    res.add_argument("--eval", type=Path, default=Path(stage("evaluate").out_dir), help="es2 evaluate output folder")
    res.add_argument("--readme", type=Path, help="rewrite this file's results block (default: print it)")

    run = add(sub, "run", "run", "run the whole pipeline as a Prefect flow (stages through DVC, then es2 register)")
    run.add_argument("--no-register", action="store_true", help="stop after the DVC stages")
    add(sub, "serve", "serve", "serve the on-demand Prefect deployment es2-pipeline/retrain (no schedule) from "
                               "this process")
    add(sub, "register", "register", "log the pipeline run and register the model (alias challenger)")
    add(sub, "promote", "promote", "promote the challenger to champion when every gate passes")

    pipe = sub.add_parser("pipeline", help="the stage table").add_subparsers(dest="action", required=True)
    add(pipe, "dvc-yaml", "pipeline dvc-yaml", "print dvc.yaml as rendered from the stage table (es2/pipeline.py)")
    return parser


def _validate(args, params) -> int:
    from es2.stages.validate import run_validate

    report = run_validate(params, args.out, args.harmful, args.harmless)
    print(report.summary())
    return 0 if report.success else 1


def _pairs(args, params) -> int:
    from es2.runtime import set_threads
    from es2.stages.pairs import run_pairs

    set_threads()
    stats = run_pairs(params, args.out)
    for split, s in stats["splits"].items():
        print(f"{split:5s}: {s['pairs']} pairs ({s['harmful']} harmful x {stats['neighbours']}), "
              f"median similarity {s['similarity']['q50']:.3f}")
    print(f"wrote {args.out}/{{train,val,eval}}.jsonl, stats.json, similarity.png")
    return 0


def _align(args, params) -> int:
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


def _train(args, params) -> int:
    from es2.launch import needs_launcher, relaunch

    if needs_launcher(params.train):
        return relaunch(params.train, args.argv)
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


def _evaluate(args, params) -> int:
    import json

    from es2.config import load_params
    from es2.headline import HeadlineRow
    from es2.report import summary_text
    from es2.runtime import set_threads
    from es2.stages.evaluate import run_evaluate

    set_threads()
    attacks = args.attacks.split(",") if args.attacks else None
    if attacks:
        params = load_params(args.params, (*args.overrides, f"evaluate.attacks={attacks}"))
    baseline = None if args.baseline == "none" else args.baseline
    metrics = run_evaluate(params, args.out, args.model, baseline, args.harmful, args.benign, None, args.limit,
                           args.compare.split(",") if args.compare else None, args.benign_limit)
    headline = json.loads((Path(args.out) / "headline.json").read_text(encoding="utf-8"))
    print(summary_text(metrics, [HeadlineRow(**r) for r in headline["rows"]], headline["verdict"],
                       params.registry.gates.alpha, params.evaluate.headline_judge,
                       headline["context"].get("efforts", [])))
    print(f"wrote {args.out}/report.html, metrics.json, examples.jsonl")
    return 0


def _register(args, params) -> int:
    from es2.stages.registry import run_register

    result = run_register(params, Path(ARTIFACTS))
    print(f"run {result['run_id']}: registered {result['model_name']} version {result['version']} "
          f"({result['model_uri']}, tracking {result['tracking_uri']})")
    return 0


def _promote(args, params) -> int:
    from es2.stages.registry import run_promote

    decision = run_promote(params)
    print(decision.table_text())
    print("promoted: challenger is now champion" if decision.promoted else "not promoted: champion unchanged")
    return 0  # a rejected challenger is a normal outcome, not a failure


def _flow(args, params) -> int:
    """`es2 run` and `es2 serve` hand over to the flows package in a process of its own: flows orchestrate es2's
    stages from above (through DVC), so es2 never imports them. The params were checked before this starts."""
    cmd = [sys.executable, "-m", "flows", args.command]
    if args.command == "run":
        cmd += [*(["--no-register"] if args.no_register else []), *(a for o in args.overrides for a in ("--set", o))]
    return subprocess.call(cmd)


# the commands that read params.yaml; the DVC stages among them are named as in es2/pipeline.py
PARAMS_COMMANDS = {"validate": _validate, "pairs": _pairs, "align": _align, "train": _train, "evaluate": _evaluate,
                   "register": _register, "promote": _promote, "run": _flow, "serve": _flow}


def _run(args) -> int:
    if args.command in PARAMS_COMMANDS:
        from es2.config import load_params

        return PARAMS_COMMANDS[args.command](args, load_params(args.params, tuple(args.overrides)))
    if args.command == "model":
        from es2.modeling import prepare_default_model

        print(f"default model ready: {prepare_default_model(force=args.force)}")
        return 0
    if args.command == "data":
        return _import_data(args)
    if args.command == "pipeline":
        from es2.pipeline import dvc_yaml

        print(dvc_yaml(), end="")
        return 0
    return _judge_or_results(args)


def _import_data(args) -> int:
    from es2.data.importers import import_records, parse_column_mapping, write_records

    columns = parse_column_mapping(args.columns) if args.columns else None
    tokens = ()
    if args.model:
        from es2.data.prompt_checks import special_token_strings
        from es2.modeling import load_tokenizer

        tokens = special_token_strings(load_tokenizer(args.model))
    records = import_records(args.format, args.input, args.label, columns, args.source, tokens)
    write_records(records, args.output)
    print(f"wrote {len(records)} records to {args.output}")
    return 0


def _judge_or_results(args) -> int:
    """The two commands that need no params.yaml: `es2 judge` and `es2 results`."""
    if args.command == "results":
        from es2.results import render, update_readme

        if args.readme:
            update_readme(args.readme, args.eval)
            print(f"rewrote the results block of {args.readme} from {args.eval}")
        else:
            print(render(args.eval))
        return 0
    from es2.runtime import set_threads

    set_threads()
    if args.responses == "train":
        from es2.judges.semantic import head_path
        from es2.stages.judge import DEFAULT_PYRIT, train_head

        out = args.out or head_path()
        document = train_head(out, args.pyrit or (DEFAULT_PYRIT if DEFAULT_PYRIT.is_dir() else None), args.seed)
        for name, m in document["held_out"].items():
            print(f"held-out PyRIT {name:9s} accuracy {m['accuracy']:.3f}  refusal recall {m['refusal_recall']:.3f}  "
                  f"false-refusal rate {m['false_refusal_rate']:.3f}  n {m['n']}")
        print(f"wrote {out}")
        return 0
    if args.out is None:
        raise ES2Error("es2 judge needs --out", "add --out judged.jsonl")
    from es2.data.importers import parse_column_mapping
    from es2.judges import get_judge
    from es2.stages.judge import judge_file

    judges = {name: get_judge(name) for name in args.judges.split(",") if name}
    if args.judge_model:
        judges["generative"] = get_judge("generative", path=args.judge_model, template=args.template)
    columns = parse_column_mapping(args.columns) if args.columns else None
    for name, (refusals, n) in judge_file(args.responses, args.out, judges, columns).items():
        print(f"{name:10s} refusals {refusals} of {n} ({refusals / n:.1%})")
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # a multi-process train relaunches itself with them
    try:
        return _run(args)
    except ES2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
