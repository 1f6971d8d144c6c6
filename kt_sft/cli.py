"""`kt-sft` command line. Thin: it parses, then calls functions that live in other modules.

    kt-sft doctor [--json]           what the engine chose and what this machine offers
    kt-sft bench kernels [options]   time one experts layer, kt_sft against transformers
"""

from __future__ import annotations

import argparse
import json
import sys


def _doctor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kt_sft import environment

    report = environment.doctor_report()
    print(json.dumps(report, indent=2) if args.json else environment.format_doctor_report(report))
    return 0 if report["engine"]["native_loaded"] else 1


def _bench_kernels(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kt_sft import bench_kernels

    try:
        bench_kernels.run(args)
    except bench_kernels.BenchConfigError as exc:
        parser.error(str(exc))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kt_sft import bench_kernels

    parser = argparse.ArgumentParser(prog="kt-sft", description="Fine-tune MoE models with CPU-resident quantized experts.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    doctor = commands.add_parser("doctor", help="show the kernel path, threads, CPU, memory and versions")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(handler=_doctor, command_parser=doctor)

    bench = commands.add_parser("bench", help="benchmarks (results go to bench_results/ as JSON)")
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    kernels = suites.add_parser(
        "kernels", help="forward/backward of one experts layer vs transformers' experts module",
        description=bench_kernels.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_kernels.add_arguments(kernels)
    kernels.set_defaults(handler=_bench_kernels, command_parser=kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args, args.command_parser)


if __name__ == "__main__":
    sys.exit(main())
