"""`python -m flows run|serve`: what `es2 run` and `es2 serve` start, in a process of their own (es2 never
imports flows: the flows orchestrate es2's stages from above).

    python -m flows run [--no-register] [--set SECTION.KEY=VALUE ...]   # the es2-pipeline flow, locally
    python -m flows serve                                               # es2-pipeline/retrain, on demand
"""

from __future__ import annotations

import argparse
import os
import sys

# Before Prefect is imported, unless the user set them: the ephemeral server needs ~17 s to start on 2 cores (the
# default timeout is 20 s), and analytics would phone home.
for _key, _value in {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}.items():
    os.environ.setdefault(_key, _value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the es2-pipeline flow in this repository")
    run.add_argument("--no-register", action="store_true", help="stop after the DVC stages")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one parameter; the stages then run as DVC experiments (repeatable)")
    sub.add_parser("serve", help="serve the on-demand deployment es2-pipeline/retrain (no schedule) from this "
                                 "process")
    args = parser.parse_args(argv)
    if args.command == "serve":
        from flows.serve import main as serve

        serve(repo=".")
        return 0
    from flows.pipeline import pipeline

    overrides = dict(o.split("=", 1) for o in args.overrides) or None
    state = pipeline(repo=".", register=not args.no_register, params_overrides=overrides, return_state=True)
    print(f"flow run {state.name}: {state.message or ''}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
