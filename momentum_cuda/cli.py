"""The `momentum-cuda` command (also `python -m momentum_cuda`).

    momentum-cuda bench [args...]   step timings; every argument goes to momentum_cuda.bench
                                    (`momentum-cuda bench --help` is the benchmark's own help)
    momentum-cuda info [--json]     versions, backends, CPU flags and ISA, GPUs
    momentum-cuda demo [options]    bitwise check against torch, plain SGD vs momentum, a plot,
                                    then `bench --quick` (see `momentum-cuda demo --help`)

Each subcommand imports its module only when it runs, so that `info` and `demo` still work where
the benchmark (or matplotlib, or triton) has an import problem.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _bench(args: argparse.Namespace) -> int:
    from momentum_cuda import bench

    return bench.main(args.bench_args)


def _info(args: argparse.Namespace) -> int:
    from momentum_cuda import info

    data = info.collect()
    print(json.dumps(data, indent=2) if args.json else info.format_text(data))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from momentum_cuda import demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser. `bench` declares no options of its own (add_help=False): main()
    hands everything after it, --help included, to the benchmark's parser untouched."""
    from momentum_cuda import demo  # its options only; torch is imported anyway

    parser = argparse.ArgumentParser(
        prog="momentum-cuda", description="momentum_cuda: a fused momentum/SGD optimizer for "
        "PyTorch, bitwise equal to torch.optim.SGD's for-loop.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("bench", add_help=False, help="time optimizer steps (args go to the benchmark; "
                   "`momentum-cuda bench --help` for them)").set_defaults(func=_bench)
    p_info = sub.add_parser("info", help="versions, backends, CPU flags and ISA, GPUs",
                            description="What this install and machine are (the keys of --json "
                                        "are documented in momentum_cuda/info.py).")
    p_info.add_argument("--json", action="store_true", help="print it as JSON")
    p_info.set_defaults(func=_info)
    p_demo = sub.add_parser("demo", help="bitwise check vs torch, plain SGD vs momentum, a plot, "
                            "then bench --quick", description=demo.DESCRIPTION)
    demo.add_arguments(p_demo)
    p_demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `momentum-cuda`; returns the subcommand's exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # parse_known_args: the unknown arguments are the benchmark's when the command is bench (kept
    # in their order); for any other command they are an error, reported as argparse does.
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = argv[argv.index("bench") + 1:]
    elif rest:
        parser.error(f"unrecognized arguments for {args.command!r}: {' '.join(rest)}")
    try:
        return args.func(args)
    except BrokenPipeError:  # `momentum-cuda info | head`: the reader left early, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no 2nd error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
