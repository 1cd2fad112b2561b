"""`python -m ldm.cli.report compare|sweep ...`: the factor-comparison report of a multirun, or a sweep's
summary table (also `python evaluate.py report=compare|sweep runs=DIR`)."""
import argparse
import os
from dataclasses import fields
from typing import Sequence

from ldm.diffusion.settings import SamplerSettings
from ldm.evaluation.reports import DEFAULT_PROMPTS, compare_factors, summarize_sweep

SETTINGS = [(field.name, type(field.default)) for field in fields(SamplerSettings)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.cli.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", help="factor comparison of a multirun directory")
    compare.add_argument("runs")
    compare.add_argument("--out", required=True)
    compare.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS))
    for name, kind in SETTINGS:  # --sampler, --steps, --cfg-scale, ...: SamplerSettings' defaults where not given
        compare.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None)
    compare.add_argument("--device", default="auto")
    sweep = commands.add_parser("sweep", help="sweep_summary.md of a sweep directory")
    sweep.add_argument("sweep_dir")
    sweep.add_argument("--metric", default=None)
    sweep.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            given = {name: getattr(args, name) for name, _ in SETTINGS if getattr(args, name) is not None}
            compare_factors(args.runs, args.out, args.prompts, SamplerSettings.of(None, **given), args.device)
            print(os.path.join(args.out, "report.md"))
        else:
            print(summarize_sweep(args.sweep_dir, args.metric, args.out))
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
