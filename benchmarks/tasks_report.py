"""The paper's image-conditioned tasks on `shapes` at CPU budgets: train each, then print its metric next to its
baseline (ldm/evaluation/tasks.py), with the minutes spent training.

    python benchmarks/tasks_report.py                                     # size=small, 15 min per task (the real run)
    python benchmarks/tasks_report.py --minutes 0.3 --ae-minutes 0.2 --num-samples 8 --sample-steps 2   # smoke run
    python benchmarks/tasks_report.py --smoke --out /tmp/tasks_smoke   # the whole path in minutes: 2 steps per stage,
                                         # 8 samples of 2 steps, a 20-step shapes classifier (numbers meaningless)
    python benchmarks/tasks_report.py --evaluate-only    # today's evaluation of the checkpoints in <out>/report.json
    python benchmarks/tasks_report.py --tasks inpaint_quickstart --init-from CKPT --init-first-stage AE
                                         # inpainting started from a quickstart run (CKPT) on its autoencoder (AE);
                                         # --init-from none: the same model from scratch

Per task: `train.py experiment=<task> size=small` with `trainer.max_time` = the budget (the stage-1 autoencoders,
trained first with their own budget, are shared by the f=4 tasks), then `evaluate.py task=...` on the val split
(shapes-CNN FID, the classifier trained once and cached). Rows: SR PSNR / SSIM / FID vs bicubic (also before the
low-res input is back-projected, `*_raw`: sampling.pixel_consistency); inpainting PSNR
outside the mask vs the autoencoder's reconstruction (also before the known pixels are pasted back) and inside vs a median fill, caption fidelity of the
completions, and of fills of the object's own grid cell vs that cell median-filled; semantic synthesis colour agreement with the map vs chance (shuffled maps) and the real images.
Writes `<out>/report.json` and `<out>/report.md`; each run keeps its directory under `<out>/runs/<task>`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ldm.evaluation.tasks import evaluate_task
from ldm.training.pipeline import train

REPO = Path(__file__).resolve().parents[1]
TASKS = {"sr": ("ldm_sr_f4", "sr"), "inpaint_f4": ("ldm_inpaint_f4", "inpaint"),
         "inpaint_f8": ("ldm_inpaint_f8", "inpaint"), "semantic": ("ldm_semantic_f4", "semantic"),
         "inpaint_quickstart": ("quickstart_inpaint", "inpaint")}  # with init_from=<a quickstart run's checkpoint>
# Per-task training overrides at CPU budgets. Semantic synthesis keeps CompVis' widths at every size ([1, 4, 8]:
# 512 channels at the lowest level, 4x the quickstart UNet's step), which in 15 CPU minutes trains ~300 steps and
# samples noise (measured: object agreement 0.10); the report trains it with the quickstart's [1, 2, 2].
FROM_TEXT_TO_IMAGE = ("inpaint_quickstart",)  # not in the default --tasks: they need --init-from
TASK_OVERRIDES = {"semantic": ["model.unet.channel_mult=[1,2,2]"]}
ROWS = {  # task kind -> (metric, baseline, what the baseline is)
    "sr": [("psnr_sample", "psnr_bicubic", "bicubic"), ("ssim_sample", "ssim_bicubic", "bicubic"),
           ("fid_sample", "fid_bicubic", "bicubic"), ("psnr_sample", "psnr_reconstruction", "autoencoder reconstruction"),
           ("fid_sample", "fid_reconstruction", "autoencoder reconstruction"),
           ("psnr_sample_raw", "psnr_bicubic", "bicubic (sample before back-projection)"),
           ("fid_sample_raw", "fid_bicubic", "bicubic (sample before back-projection)")],
    "inpaint": [("psnr_outside_sample", "psnr_outside_reconstruction", "autoencoder reconstruction"),
                ("psnr_outside_sample_raw", "psnr_outside_reconstruction", "autoencoder reconstruction (before paste)"),
                ("fid_sample", "fid_sample_raw", "the sample before the known pixels are pasted"),
                ("psnr_inside_sample", "psnr_inside_median_fill", "median fill"),
                ("prompt_fidelity_color", None, "chance 1/7"), ("prompt_fidelity_shape", None, "chance 1/3"),
                ("object_fill_color", "object_removed_color", "object's cell median-filled"),
                ("object_fill_shape", "object_removed_shape", "object's cell median-filled"),
                ("psnr_outside_object_fill", "psnr_outside_object_reconstruction", "autoencoder reconstruction")],
    "semantic": [("object_agreement_sample", "object_agreement_chance", "chance (shuffled maps)"),
                 ("object_agreement_real", None, "the judge on real images"),
                 ("agreement_sample", "agreement_chance", "chance (shuffled maps; background ~95 %)")],
}


def minutes_string(minutes: float) -> str:
    """Lightning's max_time "DD:HH:MM:SS"."""
    seconds = max(1, round(minutes * 60))
    return f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_task(name: str, experiment: str, args: argparse.Namespace, out: Path) -> tuple[str, float, bool]:
    overrides = [
        f"experiment={experiment}", f"size={args.size}", "~callbacks.sample_grid", "~after_training", "logger=csv",
        f"paths.output_dir={out / 'runs' / experiment}", f"paths.log_dir={out / 'outputs'}",
        f"paths.cache_dir={args.cache}", f"paths.data_dir={args.data}", f"data.num_workers={args.workers}",
        f"trainer.max_steps={args.max_steps}", f"+trainer.max_time={minutes_string(args.minutes)}",
        "trainer.val_check_interval=1000000", "trainer.limit_val_batches=0",
        (f"first_stage.overrides=['trainer.max_steps={args.ae_max_steps}',"
         f"'+trainer.max_time={minutes_string(args.ae_minutes)}',"
         "'trainer.val_check_interval=1000000','trainer.limit_val_batches=0']"),
        *TASK_OVERRIDES.get(name, []), *init_overrides(name, args), *args.overrides,
    ]
    stage_one_dir = Path(args.cache) / "first_stage"
    before = set(os.listdir(stage_one_dir)) if stage_one_dir.is_dir() else set()
    start = time.perf_counter()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        result = train(compose(config_name="train", overrides=overrides))
    minutes = (time.perf_counter() - start) / 60
    trained_stage_one = bool(set(os.listdir(stage_one_dir)) - before) if stage_one_dir.is_dir() else False
    return result.last_ckpt, minutes, trained_stage_one


def init_overrides(name: str, args: argparse.Namespace) -> list[str]:
    """inpaint_quickstart starts from a text-to-image quickstart run (`--init-from`) and keeps its autoencoder
    (`--init-first-stage`: the stage-1 checkpoint that run was trained on), as a user's quickstart_inpaint run
    finds it in .cache/; `--init-from none` trains the same model from scratch (the ablation's other arm)."""
    if name not in FROM_TEXT_TO_IMAGE:
        return []
    if not args.init_from or not args.init_first_stage:
        raise SystemExit(f"--tasks {name} needs --init-from (a quickstart checkpoint, or none) and --init-first-stage "
                         "(that run's stage-1 checkpoint: model.first_stage_ckpt in its config_resolved.yaml).")
    found = [f"model.first_stage_ckpt={args.init_first_stage}"]
    return found if args.init_from == "none" else [*found, f"init_from={args.init_from}"]


SMOKE = {"minutes": 1.0, "ae_minutes": 1.0, "max_steps": 2, "ae_max_steps": 2, "num_samples": 8, "sample_steps": 2,
         "classifier_steps": 20}


def features(args: argparse.Namespace) -> dict:
    """The shapes-CNN extractor; a classifier trained for other than the default steps gets its own file, so a
    smoke run's weak classifier never stands in for the real one in the shared cache."""
    if args.classifier_steps is None:
        return {"name": "shapes_cnn"}
    return {"name": "shapes_cnn", "steps": args.classifier_steps,
            "weights_path": f"{args.cache}/metrics/shapes_classifier_64px_{args.classifier_steps}steps.safetensors"}


def sampling_of(ckpt: str, args: argparse.Namespace) -> dict:
    """The run's own sampling settings (its timestep grid: trailing for a zero-terminal-SNR recipe) from the
    config saved beside its checkpoints, with the report's solver, steps and guidance."""
    saved = Path(ckpt).resolve().parents[1] / "config_resolved.yaml"
    own = dict(OmegaConf.to_container(OmegaConf.load(saved).sampling, resolve=True)) if saved.is_file() else {}
    return {**own, "sampler": "dpmpp_2m", "steps": args.sample_steps, "cfg_scale": args.cfg_scale}


def evaluate(kind: str, ckpt: str, args: argparse.Namespace, out: Path) -> dict:
    data = {"_target_": "ldm.data.webdataset.ShapesDataModule", "root": f"{args.data}/shapes_64px", "resolution": 64,
            "batch_size": 32, "num_workers": args.workers}
    return evaluate_task(kind, str(out), ckpt, data, num_samples=args.num_samples, sampling=sampling_of(ckpt, args),
                         batch_size=32,
                         features=features(args), cache_dir=f"{args.cache}/metrics")


def markdown(results: dict[str, dict]) -> str:
    lines = ["| task | metric | value | baseline | baseline value | training min (wall) |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        metrics = result["metrics"]
        for metric, baseline, label in ROWS[TASKS[name][1]]:
            value = metrics.get(metric)
            reference = metrics.get(baseline) if baseline else None
            spent = f"{result['train_minutes']:.1f}" + (" (incl. stage 1)" if result["trained_stage_one"] else "")
            lines.append(f"| {name} | {metric} | {_fmt(value)} | {label} | {_fmt(reference)} | {spent} |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(name for name in TASKS if name not in FROM_TEXT_TO_IMAGE),
                        help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--init-from", default=None,
                        help="inpaint_quickstart: the quickstart checkpoint to start from ('none': from scratch)")
    parser.add_argument("--init-first-stage", default=None, help="inpaint_quickstart: that run's stage-1 checkpoint")
    parser.add_argument("--minutes", type=float, default=15.0, help="stage-2 training budget per task")
    parser.add_argument("--ae-minutes", type=float, default=5.0, help="budget of each stage-1 autoencoder")
    parser.add_argument("--max-steps", type=int, default=1_000_000, help="stage-2 step cap (smoke runs: 2)")
    parser.add_argument("--ae-max-steps", type=int, default=1_000_000, help="stage-1 step cap (smoke runs: 2)")
    parser.add_argument("--size", default="small", choices=["tiny", "small", "paper"])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--classifier-steps", type=int, default=None,
                        help="train the shapes classifier for this many steps (default: its own, 400)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="re-evaluate the checkpoints of <out>/report.json instead of training")
    parser.add_argument("--smoke", action="store_true", help=f"check the whole path in minutes: {SMOKE}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/tasks")
    parser.add_argument("--cache", default=None, help="stage-1 / metrics cache (default: <out>/cache)")
    parser.add_argument("--data", default=None, help="data directory (default: <out>/data)")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for every task")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    args.cache = args.cache or str(out / "cache")
    args.data = args.data or str(out / "data")
    earlier = json.loads((out / "report.json").read_text())["results"] if args.evaluate_only else {}
    results = {}
    for name in args.tasks.split(","):
        experiment, kind = TASKS[name]
        if args.evaluate_only:  # the checkpoint and minutes of the earlier run, evaluated by today's code
            if name not in earlier:
                parser.error(f"--evaluate-only: {out / 'report.json'} has no {name!r}; train it first")
            ckpt, minutes, trained_stage_one = (earlier[name][key] for key in ("ckpt", "train_minutes", "trained_stage_one"))
        else:
            ckpt, minutes, trained_stage_one = train_task(name, experiment, args, out)
        metrics = evaluate(kind, ckpt, args, out / "evaluations" / name)
        results[name] = {"experiment": experiment, "ckpt": ckpt, "train_minutes": minutes,
                         "trained_stage_one": trained_stage_one, "metrics": metrics}
        print(markdown({name: results[name]}), flush=True)
    os.makedirs(out, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
    (out / "report.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
