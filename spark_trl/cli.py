"""The ``spark-trl`` command line. Each subcommand lives with the module it drives; this file only routes.

    spark-trl split   # the study's MBPP split (sizes and task ids)
"""

from __future__ import annotations

import argparse
import json
import sys


def _split(argv: list[str]) -> int:
    from .data import load_mbpp, split_mbpp

    parser = argparse.ArgumentParser(prog="spark-trl split", description="Show the study's MBPP split.")
    parser.add_argument("--mbpp", default=None, help="local MBPP-sanitized .json/.jsonl (default: the hub)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--heldout", type=int, default=100)
    parser.add_argument("--max_train_problems", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the task ids as JSON")
    args = parser.parse_args(argv)
    split = split_mbpp(load_mbpp(args.mbpp), seed=args.seed, heldout=args.heldout,
                       max_train_problems=args.max_train_problems)
    if args.json:
        print(json.dumps({"train": [p.number for p in split.train], "heldout": [p.number for p in split.heldout]}))
    else:
        print(f"training pool {len(split.pool)}, trained on {len(split.train)}, held out {len(split.heldout)}")
    return 0


# name -> (module, function, one-line help). Functions take argv and return an exit code.
COMMANDS = {
    "split": (__name__, "_split", "show the study's MBPP split"),
    "eval": ("spark_trl.evaluation", "eval_main", "pass@k of a model / adapter on HumanEval and held-out MBPP"),
    "train": ("spark_trl.recipes", "train_main", "run the study (a recipe: --recipe condition_a)"),
    "demo": ("spark_trl.demo", "demo_main", "Condition A end to end on a small model and built-in problems (CPU)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("usage: spark-trl <command> [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, function, _ = COMMANDS[argv[0]]
    import importlib

    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
