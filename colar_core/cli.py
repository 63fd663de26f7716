"""The ``colar`` command.

``colar data prepare`` runs on the library alone. The pipeline commands (``run``, ``retry``,
``compare``, ``servers``) live in ``flows.cli`` and are imported only when asked for, so that
``colar data prepare`` and ``import colar_core`` never pull in Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

PIPELINE_COMMANDS = ("run", "retry", "compare", "servers", "evaluate")


def _data_prepare(args: argparse.Namespace) -> int:
    from colar_core.data.prepare import prepare_data
    from colar_core.data.records import DataError

    builtin = None
    if args.input == "builtin":
        builtin = dict(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed,
                       difficulty=args.difficulty)
    try:
        manifest = prepare_data(args.input, args.out, format=args.format, policy=args.policy, seed=args.seed,
                                val_fraction=args.val_fraction, test_fraction=args.test_fraction, builtin=builtin)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"colar data prepare: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colar", description="Compressed Latent Reasoning pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="read, validate and split a dataset; write a manifest")
    prep.add_argument("--input", required=True, help="'builtin', a file, a directory of split files, or a HF dataset id / saved path")
    prep.add_argument("--format", default="auto", choices=["auto", "gsm8k-aug", "jsonl", "gsm8k", "hf"])
    prep.add_argument("--out", required=True, help="output directory for {train,val,test}.jsonl and manifest.json")
    prep.add_argument("--policy", default="fail", choices=["fail", "skip"], help="bad records: fail (default) or skip and count")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--val-fraction", type=float, default=0.1)
    prep.add_argument("--test-fraction", type=float, default=0.1)
    prep.add_argument("--n-train", type=int, default=2000, help="builtin only")
    prep.add_argument("--n-val", type=int, default=200, help="builtin only")
    prep.add_argument("--n-test", type=int, default=200, help="builtin only")
    prep.add_argument("--difficulty", default="easy", help="builtin only: easy | medium | hard | max steps")
    prep.set_defaults(func=_data_prepare)

    for name in PIPELINE_COMMANDS:
        p = sub.add_parser(name, help=f"pipeline: {name} (see `colar {name} --help`)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PIPELINE_COMMANDS:
        try:
            from flows.cli import main as pipeline_main
        except ImportError as err:  # prefect/mlflow not installed: say so plainly
            print(f"colar {argv[0]}: the pipeline needs prefect and mlflow ({err})", file=sys.stderr)
            return 2
        return pipeline_main(argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
