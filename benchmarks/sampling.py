"""Sample quality vs UNet calls per solver: which solver and timestep grid match DDIM-50 with the fewest calls.

One `shapes` checkpoint is sampled (same seeds, same prompts) with DDIM 50 steps (the reference: Stable
Diffusion's inference default) and DPM-Solver++ 2M (Lu et al. 2022, Alg. 2 multistep) at 8 / 10 / 12 / 20
steps on each timestep spacing the samplers support ("leading", "trailing", "linspace"; Karras et al. 2022's
sigma spacing is not implemented: DPM-Solver++ here runs on the model's discrete timesteps). Each setting
is evaluated through `evaluate.py`'s sweep (ldm/evaluation/sweep.py: FID, precision / recall, prompt
fidelity on shapes with the shapes-CNN features), so every number here is also in `<out>/sweep.json` and
can be checked with a plain `evaluate.py`.

UNet calls: both solvers make one UNet call per step (DPM-Solver++ 2M reuses the previous step's output
for its second order); classifier-free guidance batches the conditional and unconditional inputs into
that one call. A setting "matches" DDIM-50 when its FID is at most `--fid-tolerance` (relative) above and
its prompt fidelity at most `--fidelity-tolerance` (absolute) below DDIM-50's.

    python benchmarks/sampling.py --ckpt PATH [--num-samples 1000] [--steps 8 10 12 20] [--out DIR]
    python benchmarks/sampling.py --ckpt PATH --override features=inception_v3   # any evaluate.py key
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_dir  # noqa: E402

from ldm.cli.evaluate import sweep_of_settings  # noqa: E402
from ldm.diffusion.samplers import TIMESTEP_SPACINGS  # noqa: E402
from ldm.diffusion.settings import SamplerSettings  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "ldm" / "configs"
REFERENCE = ("ddim", 50, "leading")
FAST_SOLVER = "dpmpp_2m"


def solver_grid(steps: list[int], spacings: list[str], base: SamplerSettings) -> list[SamplerSettings]:
    """DDIM 50 (the reference), then DPM-Solver++ 2M at every (steps, spacing); the rest from `base`."""
    sampler, reference_steps, spacing = REFERENCE
    grid = [SamplerSettings.of(base, sampler=sampler, steps=reference_steps, timestep_spacing=spacing)]
    grid += [SamplerSettings.of(base, sampler=FAST_SOLVER, steps=n, timestep_spacing=s) for s in spacings for n in steps]
    return grid


def unet_calls(setting: dict) -> int:
    """UNet forward passes per image batch: one per step for DDIM and DPM-Solver++ 2M (guidance is batched)."""
    return int(setting["steps"])


def summarize(records: list[dict], fid_tolerance: float, fidelity_tolerance: float) -> dict:
    """Rows with UNet calls and the quality gap to DDIM-50; the fewest-call setting that matches it."""
    reference = records[0]
    rows = []
    for record in records:
        setting = record["setting"]
        fidelity, ref_fidelity = record.get("prompt_fidelity_all"), reference.get("prompt_fidelity_all")
        matches = record["fid"] <= reference["fid"] * (1 + fid_tolerance) and (
            fidelity is None or ref_fidelity is None or fidelity >= ref_fidelity - fidelity_tolerance)
        rows.append(dict(label=record["label"], sampler=setting["sampler"], spacing=setting["timestep_spacing"],
                         steps=setting["steps"], unet_calls=unet_calls(setting), fid=record["fid"],
                         fid_name=record.get("fid_name"), prompt_fidelity=fidelity,
                         precision=record["precision"], recall=record["recall"],
                         seconds_per_image=record["seconds_per_image"], matches_reference=bool(matches)))
    matching = [row for row in rows[1:] if row["matches_reference"]]
    best = min(matching, key=lambda row: (row["unet_calls"], row["fid"])) if matching else None
    return dict(reference=rows[0]["label"], rows=rows, fewest_calls_matching_reference=best,
                fid_tolerance=fid_tolerance, fidelity_tolerance=fidelity_tolerance)


def print_table(summary: dict) -> None:
    rows = summary["rows"]
    fid_name = rows[0]["fid_name"] or "FID"
    print(f"| solver | spacing | steps | UNet calls | {fid_name} | prompt fidelity | precision | recall | s / image | "
          "matches DDIM-50 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        fidelity = "–" if row["prompt_fidelity"] is None else f"{row['prompt_fidelity']:.3f}"
        print(f"| {row['sampler']} | {row['spacing']} | {row['steps']} | {row['unet_calls']} | {row['fid']:.3f} | "
              f"{fidelity} | {row['precision']:.3f} | {row['recall']:.3f} | {row['seconds_per_image']:.3f} | "
              f"{'reference' if row is rows[0] else ('yes' if row['matches_reference'] else 'no')} |")
    best = summary["fewest_calls_matching_reference"]
    if best is None:
        print("No DPM-Solver++ setting matched DDIM-50 within the tolerances.")
    else:
        print(f"Fewest UNet calls at DDIM-50 quality: {best['label']} ({best['unet_calls']} calls, "
              f"{rows[0]['unet_calls'] / best['unet_calls']:.1f}x fewer).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a LatentDiffusion checkpoint trained on shapes")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 10, 12, 20])
    parser.add_argument("--spacings", nargs="+", choices=TIMESTEP_SPACINGS, default=list(TIMESTEP_SPACINGS))
    parser.add_argument("--fid-tolerance", type=float, default=0.05, help="relative FID margin over DDIM-50")
    parser.add_argument("--fidelity-tolerance", type=float, default=0.01, help="absolute prompt-fidelity margin")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sampling")
    parser.add_argument("--override", nargs="*", default=[], help="more evaluate.py overrides (key=value)")
    args = parser.parse_args()
    if not os.path.isfile(args.ckpt):
        raise SystemExit(f"--ckpt {args.ckpt}: no such file. Pass a shapes LatentDiffusion checkpoint "
                         "(<run dir>/checkpoints/last.ckpt of `python train.py`).")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"ckpt={os.path.abspath(args.ckpt)}", f"out={args.out.resolve()}", f"num_samples={args.num_samples}",
            *args.override])
    grid = solver_grid(args.steps, args.spacings, SamplerSettings.of(dict(cfg.sampling)))
    sweep_of_settings(cfg, settings_list=grid)
    records = json.loads((args.out / "sweep.json").read_text())["settings"]
    summary = summarize(records, args.fid_tolerance, args.fidelity_tolerance)
    print_table(summary)
    (args.out / "sampling.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'sampling.json'} (every setting's metrics: {args.out / 'sweep.json'})")


if __name__ == "__main__":
    main()
