"""`kt-sft` command line. Thin: it parses, then calls functions that live in other modules.

    kt-sft doctor [--json] [--peak]  what the engine chose and what this machine offers (and its peaks)
    kt-sft convert --model DIR --out DIR --format {bf16,int8,int4} [--force]
                                     a Hugging Face MoE checkpoint -> a kt_sft model directory
    kt-sft export --model DIR [--adapter DIR] --out DIR [--dtype {bf16,fp16,fp32}] [--force]
                                     a kt_sft model (+ LoRA adapter) -> one merged Hugging Face checkpoint
    kt-sft verify DIR                check every tensor of a converted model's expert pack
    kt-sft bench kernels [options]   time one experts layer, kt_sft against transformers
    kt-sft bench compare [options]   one LoRA SFT job: kt_sft vs plain HF vs ZeRO-Offload, side by side
"""

from __future__ import annotations

import argparse
import json
import sys


def _doctor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kt_sft import environment

    report = environment.doctor_report(peak=args.peak)
    print(json.dumps(report, indent=2) if args.json else environment.format_doctor_report(report))
    return 0 if report["engine"]["native_loaded"] else 1


def _bench_kernels(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kt_sft.bench import bench_kernels

    try:
        bench_kernels.run(args)
    except bench_kernels.BenchConfigError as exc:
        parser.error(str(exc))
    return 0


def _bench_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kt_sft.bench import compare

    try:
        compare.run(compare.config_from_args(args))
    except compare.CompareConfigError as exc:
        parser.error(str(exc))
    return 0


def _convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kt_sft.integration.convert import convert

    try:
        report = convert(args.model, args.out, args.format, force=args.force, progress=not args.quiet)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    except KeyError as exc:  # a tensor the config promises is not in the shards
        parser.error(f"the checkpoint lacks tensor {exc}; nothing was written")
    worst = max(report["expert_rel_error"].values())
    print(f"converted {report['arch']} ({len(report['moe_layers'])} MoE layers x {report['num_experts']} experts) "
          f"to {report['format']} in {report['seconds']} s: pack {report['pack_bytes'] / 2**20:.1f} MiB, "
          f"worst layer relative error {worst:.2e}, peak RSS {report['peak_rss_mib']:.0f} MiB -> {report['out_dir']}")
    return 0


def _export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kt_sft.integration import export

    try:
        r = export.export(args.model, args.out, args.adapter, args.dtype, force=args.force, progress=not args.quiet)
    except (FileExistsError, FileNotFoundError, ValueError, export.InsufficientResources) as exc:
        parser.error(str(exc))
    lora = ("no adapter" if r["adapter_dir"] is None
            else "adapter merged, expert LoRA included" if r["expert_lora_merged"] else "adapter merged")
    print(f"exported {r['class']} ({r['params']:,} parameters, {r['pack_format']} experts, {lora}) as {r['dtype']} "
          f"in {r['seconds']} s, peak RSS {r['peak_rss_mib']:.0f} MiB -> {r['out_dir']}")
    return 0


def _verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json as _json
    from pathlib import Path

    from kt_sft.engine.pack_file import PACK_NAME, PackFile

    path = Path(args.path)
    if path.is_dir():
        block = _json.loads((path / "config.json").read_text()).get("kt_sft", {}) if (path / "config.json").exists() else {}
        path = path / block.get("pack", PACK_NAME)
    try:
        pack = PackFile(path, verify=True)
    except (OSError, ValueError) as exc:
        print(f"FAILED: {exc}")
        return 1
    print(f"ok: {path} ({pack.header.format}, {len(pack.layers)} layers, {path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kt_sft.bench import bench_kernels

    parser = argparse.ArgumentParser(prog="kt-sft", description="Fine-tune MoE models with CPU-resident quantized experts.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    doctor = commands.add_parser("doctor", help="show the kernel path, threads, CPU, memory and versions")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--peak", action="store_true",
                        help="also measure each SIMD / AMX instruction's peak on the engine's threads (~2 s)")
    doctor.set_defaults(handler=_doctor, command_parser=doctor)

    conv = commands.add_parser("convert", help="convert a Hugging Face MoE checkpoint for kt_sft")
    conv.add_argument("--model", required=True, help="directory with config.json and *.safetensors")
    conv.add_argument("--out", required=True, help="output directory (created atomically)")
    conv.add_argument("--format", default="int8", choices=["bf16", "int8", "int4"], help="expert weight format")
    conv.add_argument("--force", action="store_true", help="replace a non-empty --out")
    conv.add_argument("--quiet", action="store_true", help="no progress bars")
    conv.set_defaults(handler=_convert, command_parser=conv)

    exp = commands.add_parser("export", help="write a merged Hugging Face checkpoint (experts dense, LoRA merged)")
    exp.add_argument("--model", required=True, help="a `kt-sft convert` output directory")
    exp.add_argument("--adapter", help="PEFT LoRA adapter directory to merge (e.g. LLaMA-Factory's output_dir)")
    exp.add_argument("--out", required=True, help="output directory (created atomically)")
    exp.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weight dtype written")
    exp.add_argument("--force", action="store_true", help="replace a non-empty --out")
    exp.add_argument("--quiet", action="store_true", help="no progress bars")
    exp.set_defaults(handler=_export, command_parser=exp)

    ver = commands.add_parser("verify", help="check the CRC-32 of every tensor in an expert pack")
    ver.add_argument("path", help="a converted model directory or an .ktpack file")
    ver.set_defaults(handler=_verify, command_parser=ver)

    bench = commands.add_parser("bench", help="benchmarks (results go to bench_results/ as JSON)")
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    kernels = suites.add_parser(
        "kernels", help="forward/backward of one experts layer vs transformers' experts module",
        description=bench_kernels.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_kernels.add_arguments(kernels)
    kernels.set_defaults(handler=_bench_kernels, command_parser=kernels)
    from kt_sft.bench import compare

    comp = suites.add_parser(
        "compare", help="one LLaMA-Factory LoRA SFT job: kt_sft vs plain HF vs DeepSpeed ZeRO-Offload",
        description=compare.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_arguments(comp)
    comp.set_defaults(handler=_bench_compare, command_parser=comp)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args, args.command_parser)


if __name__ == "__main__":
    sys.exit(main())
