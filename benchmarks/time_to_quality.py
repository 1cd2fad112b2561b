"""Wall minutes of the quickstart recipe to given prompt-fidelity levels: the frontier, and today's step vs before.

Why this exists: what a user feels is minutes to a sample that matches its prompt, not steps/s. One seeded
training run of the recipe (`experiment=quickstart`, stage 1 reused from .cache/ or trained first and not
counted) saves a checkpoint every --every steps; afterwards each checkpoint's EMA weights are sampled and judged
exactly like the quickstart's own evaluation (prompt fidelity by the shapes judge, FID_shapes_cnn, precision /
recall; the recipe's sampler). A checkpoint's minute is the run's own clock: its file's write time after the
start of stage 2 (the latent encode, the data setup and every step included; no grid, no validation).

Before vs after (issue 18): the trajectory in *steps* is a property of the recipe, while the cached latents and
the data vocabulary change only what a step costs (the cache keeps the same centre crop and draws the posterior
per step as the encoder would; unused embedding rows never reach the output). So the "before" minutes are the
same steps at the step cost of images + the full CLIP vocabulary: the measured minutes plus, per step, the
difference of the two contenders' totals in `benchmarks/train_step.py` (alternating rounds in one process,
--step-times). The before column keeps the after run's setup, the once-only latent encode included, so it is
charged a cost it would not have: the ratio is a lower bound.

    python benchmarks/time_to_quality.py                                  # 2,400 steps, a checkpoint per 200
    python benchmarks/time_to_quality.py --steps 40 --every 20 --num-samples 16 --size tiny   # a smoke run
    python benchmarks/time_to_quality.py --from-json REPORT.json   # the before column again, after a new train_step.py

Writes benchmarks/results/time_to_quality.json and prints the frontier and the minutes to each target.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from ldm.evaluation.evaluate import evaluate
from ldm.training.pipeline import train
from ldm.training.stages import ensure_first_stage

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(REPO / "ldm" / "configs")
RESULTS = REPO / "benchmarks" / "results"
HEADS = ("color", "shape", "position", "all")
# The caption-following issue's targets (15) and two intermediate levels, as head=level.
DEFAULT_TARGETS = "position=0.5,position=0.8,color=0.95,shape=0.5,shape=0.85,all=0.2,all=0.5"


def compose_run(args: argparse.Namespace, run_dir: Path) -> Any:
    """The recipe as the quickstart runs it, minus what is not training (grids, validation, after-training), with
    every periodic checkpoint kept."""
    overrides = [
        f"experiment={args.experiment}", f"size={args.size}", f"seed={args.seed}", "~callbacks.sample_grid",
        "~after_training", f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=0",
        f"callbacks.model_checkpoint.every_n_train_steps={args.every}", "callbacks.checkpoint_retention.keep_last=null",
        f"paths.output_dir={run_dir}", f"paths.log_dir={run_dir.parent}", *args.overrides,
    ]
    if args.size == "tiny":  # size=tiny's stage 1 keeps LPIPS, whose VGG weights are a download: off here
        overrides.append("first_stage.overrides=['trainer.max_steps=50','trainer.val_check_interval=50',"
                         "'model.loss.perceptual_weight=0']")
    return compose(config_name="train", overrides=overrides)


def checkpoint_minutes(run_dir: Path, start: float) -> dict[int, tuple[str, float]]:
    """step -> (checkpoint, minutes after `start` at which it was written; the checkpoint IO renames a finished
    file into place, so its mtime is when the step's state was complete)."""
    found = {}
    for path in glob.glob(str(run_dir / "checkpoints" / "step*.ckpt")):
        step = int(re.search(r"step(\d+)\.ckpt$", path).group(1))
        found[step] = (path, (os.stat(path).st_mtime - start) / 60)
    return dict(sorted(found.items()))


def step_cost_difference_ms(path: Path) -> tuple[float | None, dict[str, Any] | None]:
    """Milliseconds per step that images + the full vocabulary cost over cached latents + the data vocabulary,
    from a train_step.py report (None if there is none)."""
    if not path.is_file():
        return None, None
    report = json.loads(path.read_text())
    totals = {(r["data"], r["vocabulary"]): r["total_ms"] for r in report["results"]}
    before, after = totals[("images", "full")], totals[("latents", "data")]
    return before - after, {"before_ms": before, "after_ms": after, "threads": report["setup"].get("threads"), "file": str(path)}


def minutes_to(rows: list[dict[str, Any]], head: str, level: float, key: str) -> float | None:
    """The first checkpoint's minutes (column `key`) at which fidelity `head` reaches `level`; None if none does."""
    for row in rows:
        if row[f"fidelity_{head}"] >= level:
            return row[key]
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    root = Path(args.runs) / f"{args.experiment}_seed{args.seed}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose_run(args, root / "run")
        with open_dict(cfg):  # stage 1 outside the clock (trained once, then reused from .cache/)
            cfg.model.first_stage_ckpt = ensure_first_stage(cfg, train)
        start = time.time()
        train(cfg)
        checkpoints = checkpoint_minutes(root / "run", start)
        sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
        rows = []
        for step, (ckpt, minutes) in checkpoints.items():
            metrics = evaluate(str(root / "evaluations" / f"step{step:07d}"), ckpt=ckpt, data=cfg.data,
                               num_samples=args.num_samples, cache_dir=os.path.join(cfg.paths.cache_dir, "metrics"),
                               sampling=sampling, batch_size=args.batch_size, device="cpu")
            rows.append({"step": step, "minutes": round(minutes, 2),
                         **{f"fidelity_{h}": metrics[f"prompt_fidelity_{h}"] for h in HEADS},
                         "fid": metrics["fid"], "fid_name": metrics["fid_name"], "precision": metrics["precision"],
                         "recall": metrics["recall"]})
            print(frontier_table(rows[-1:]), flush=True)
    return with_before_and_targets({
        "experiment": args.experiment, "size": args.size, "seed": args.seed, "threads": args.threads,
        "steps": args.steps, "every": args.every, "num_samples": args.num_samples, "sampling": sampling,
        "overrides": args.overrides, "runs": str(root), "frontier": rows}, args)


def with_before_and_targets(report: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The report with its before column (from --step-times) and the minutes to each of --targets."""
    rows = report["frontier"]
    difference_ms, step_times = step_cost_difference_ms(Path(args.step_times))
    for row in rows:
        row["minutes_before"] = (round(row["minutes"] + row["step"] * difference_ms / 60_000, 2)
                                 if difference_ms is not None else None)
    targets = []
    for target in args.targets.split(","):
        head, level = target.split("=")
        after, before = minutes_to(rows, head, float(level), "minutes"), minutes_to(rows, head, float(level), "minutes_before")
        targets.append({"head": head, "level": float(level), "minutes": after, "minutes_before": before,
                        "speedup": round(before / after, 3) if after and before else None})
    return {**report, "step_times": step_times, "targets": targets}


def frontier_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| step | min | min (before) | colour | shape | position | all | FID | precision | recall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        before = "-" if r.get("minutes_before") is None else f"{r['minutes_before']:.1f}"
        lines.append(f"| {r['step']} | {r['minutes']:.1f} | {before} | " + " | ".join(
            f"{r[f'fidelity_{h}']:.3f}" for h in HEADS) + f" | {r['fid']:.1f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    return "\n".join(lines)


def targets_table(targets: list[dict[str, Any]], has_before: bool = True) -> str:
    lines = ["| target | minutes | minutes (before) | speed-up |", "|---|---|---|---|"]
    for t in targets:
        cells = ["not reached" if t[k] is None else f"{t[k]:.1f}" for k in ("minutes", "minutes_before")]
        cells[1] = cells[1] if has_before else "- (no train_step.json)"
        speedup = "-" if t["speedup"] is None else f"{t['speedup']:.2f}x"
        lines.append(f"| {t['head']} >= {t['level']} | {cells[0]} | {cells[1]} | {speedup} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--size", default="small", choices=["small", "tiny"])
    parser.add_argument("--steps", type=int, default=2400, help="stage-2 steps of the one training run")
    parser.add_argument("--every", type=int, default=200, help="a checkpoint (a frontier point) every this many steps")
    parser.add_argument("--num-samples", type=int, default=256, help="generated images per evaluated checkpoint")
    parser.add_argument("--batch-size", type=int, default=32, help="sampling batch size")
    parser.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated head=level")
    parser.add_argument("--step-times", default=str(RESULTS / "train_step.json"),
                        help="benchmarks/train_step.py's report, for the before column")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--runs", default=str(REPO / "outputs" / "time_to_quality"))
    parser.add_argument("--out", default=str(RESULTS / "time_to_quality.json"))
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides (e.g. model.learning_rate=6e-4)")
    parser.add_argument("--from-json", default=None,
                        help="no training: recompute the before column and the targets of this earlier report")
    args = parser.parse_args()
    report = with_before_and_targets(json.loads(Path(args.from_json).read_text()), args) if args.from_json else run(args)
    print(frontier_table(report["frontier"]))
    print(targets_table(report["targets"], has_before=report["step_times"] is not None))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
