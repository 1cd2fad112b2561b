"""The full stage-2 training step, broken down: images vs cached latents, full vs data text vocabulary.

Every contender is the quickstart's model (`python train.py`: experiment=quickstart, size=small, 64 px shapes,
f=4, batch 32; random weights: speed does not depend on them) running LatentDiffusion's own step, phase by
phase, each timed on its own:

    data          the DataModule's next batch (num_workers=0: in this process, so it is attributed;
                  with workers it overlaps the step but still competes for the same cores)
    encode        the latent: frozen first-stage encode + posterior draw, or mean + std * eps from the cache
    conditioning  the text encoder's forward (tokenize, embed, transformer) with classifier-free dropout
    unet_fwd      t and noise draws, q_sample, the UNet forward and the loss (DiffusionObjective)
    backward      loss.backward() (the UNet's and the text encoder's backward)
    guard         the non-finite gradient check (NonFiniteGradientGuard.arm: one foreach norm)
    optimizer     fused AdamW step + zero_grad (UNet + text encoder)
    ema           the EMA update of the trainable weights

"outside UNet" is everything but unet_fwd and backward (the backward also holds the text encoder's; the
share is thus a lower bound). The contenders alternate in rounds inside one process, so machine noise hits
all alike; medians per phase are reported, with parameter counts and the checkpoint's state-dict size.

    python benchmarks/train_step.py [--threads 1] [--rounds 4] [--steps-per-round 3] [--num-train 1024]
                                    [--overrides experiment=ldm_f8_text data.resolution=64 ...]

Writes benchmarks/results/train_step.json (the table is printed).
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.data.latent_cache import train_from_cache  # noqa: E402
from ldm.inference.latent_cache import encode_latents_with  # noqa: E402
from ldm.loading.checkpoints import build_latent_diffusion  # noqa: E402
from ldm.models.conditioners import drop_mask  # noqa: E402
from ldm.models.latent_diffusion import LatentDiffusion  # noqa: E402
from ldm.models.vocabulary import vocabulary_of_captions  # noqa: E402
from ldm.training.text_vocabulary import train_captions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PHASES = ("data", "encode", "conditioning", "unet_fwd", "backward", "guard", "optimizer", "ema")
UNET_PHASES = ("unet_fwd", "backward")
CONTENDERS = [("images", "full"), ("images", "data"), ("latents", "full"), ("latents", "data")]


def compose_configs(overrides: list[str]) -> tuple[dict, dict]:
    """(stage-2 config, its stage-1 autoencoder's constructor arguments) as `train.py` composes them."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=quickstart", *overrides])
        stage1 = compose("train", overrides=[f"experiment={cfg.first_stage.experiment}", f"size={cfg.size.name}"])
    return cfg, OmegaConf.to_container(stage1.model.vae, resolve=True)


def build_model(cfg, vae: dict, vocabulary: list[int] | None) -> LatentDiffusion:
    model_cfg = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if not k.startswith("_")}
    model_cfg.update(first_stage=vae, first_stage_ckpt=None)
    model_cfg["conditioner"]["vocabulary"] = vocabulary
    torch.manual_seed(0)
    return build_latent_diffusion(model_cfg)


class Step:
    """One contender: a model, its optimizer and an endless stream of its data module's training batches."""

    def __init__(self, model: LatentDiffusion, datamodule) -> None:
        self.model = model.train()
        self.optimizer = model.configure_optimizers()["optimizer"]
        self.params = list(model.trainable.parameters())
        self.batches = itertools.chain.from_iterable(iter(datamodule.train_dataloader()) for _ in itertools.count())
        first = next(self.batches)
        model._init_scale_factor(first)  # as on_train_batch_start does at the first step

    def timed(self) -> dict[str, float]:
        model, times = self.model, {}
        clock = time.perf_counter()

        def mark(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            times[phase], clock = now - clock, now

        batch = next(self.batches)
        mark("data")
        latents = model.batch_latents(batch) * model.scale_factor
        mark("encode")
        drop = drop_mask(latents.shape[0], model.hparams.p_uncond)
        cond = model.conditioning(batch, drop, latent_size=latents.shape[-2:])
        mark("conditioning")
        losses, _ = model.objective(lambda z, t: model(z, t, cond), model.schedule, latents)
        loss = losses.mean()
        mark("unet_fwd")
        loss.backward()
        mark("backward")
        model.nonfinite_guard.arm(self.optimizer, self.params)
        mark("guard")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
        model.ema.update(model.trainable)
        mark("ema")
        return times


def checkpoint_megabytes(model: LatentDiffusion) -> float:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    cfg, vae = compose_configs(args.overrides)
    batch_size = int(cfg.data.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        data_cfg = OmegaConf.merge(cfg.data, {"root": f"{tmp}/shapes", "num_train": args.num_train,
                                              "num_val": batch_size, "num_workers": 0})
        make_data = lambda: hydra.utils.instantiate(data_cfg)  # noqa: E731
        images = make_data()
        images.prepare_data()
        tokenizer = cfg.model.conditioner.get("tokenizer", "ViT-L-14")
        ids = vocabulary_of_captions(tokenizer, train_captions(images))
        first_stage = build_model(cfg, vae, None).first_stage  # every contender's (same seed)
        start = time.perf_counter()
        encode_latents_with(first_stage, images, f"{tmp}/latents", batch_size=batch_size, splits=("train",))
        encode_seconds = time.perf_counter() - start
        latents = make_data()
        train_from_cache(latents, f"{tmp}/latents", first_stage)  # refused unless it is every contender's
        steps = {}
        for source, vocab in CONTENDERS:
            model = build_model(cfg, vae, ids if vocab == "data" else None)
            steps[(source, vocab)] = Step(model, images if source == "images" else latents)
        for step in steps.values():  # warm-up: first-call allocations, AdamW and EMA state
            for _ in range(args.warmup):
                step.timed()
        times = {key: {phase: [] for phase in PHASES} for key in steps}
        for round_index in range(args.rounds):
            order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
            for key in order:
                for _ in range(args.steps_per_round):
                    for phase, seconds in steps[key].timed().items():
                        times[key][phase].append(seconds)
    results = []
    for (source, vocab), step in steps.items():
        phases = {phase: 1e3 * statistics.median(values) for phase, values in times[(source, vocab)].items()}
        total = sum(phases.values())
        outside = total - sum(phases[p] for p in UNET_PHASES)
        conditioner = step.model.conditioner
        results.append(dict(
            data=source, vocabulary=vocab, phases_ms=phases, total_ms=total, outside_unet_share=outside / total,
            samples_per_s=1e3 * batch_size / total,
            trainable_parameters=sum(p.numel() for p in step.params),
            text_encoder_parameters=sum(p.numel() for p in conditioner.parameters()),
            checkpoint_state_dict_mb=checkpoint_megabytes(step.model),
        ))
    return dict(
        setup=dict(config=["experiment=quickstart", *args.overrides], batch_size=batch_size,
                   resolution=int(cfg.data.resolution), first_stage_factor=int(cfg.model.first_stage_factor),
                   threads=torch.get_num_threads(), num_train=args.num_train, data_vocabulary_ids=len(ids),
                   full_vocabulary=49408, rounds=args.rounds, steps_per_round=args.steps_per_round,
                   warmup=args.warmup, cache_encode_seconds=encode_seconds, torch=torch.__version__,
                   statistic="median per phase over all timed steps", dataloader_workers=0),
        results=results,
    )


def print_table(report: dict) -> None:
    setup = report["setup"]
    print(f"{' '.join(setup['config'])}: batch {setup['batch_size']}, {setup['resolution']} px, f={setup['first_stage_factor']},"
          f" threads={setup['threads']}, data vocabulary {setup['data_vocabulary_ids']} ids + OOV vs "
          f"{setup['full_vocabulary']}; cache of {setup['num_train']} images written in "
          f"{setup['cache_encode_seconds']:.1f} s; medians in ms")
    header = "| data    | vocab | " + " | ".join(f"{p:>12}" for p in PHASES) + " |  total | outside UNet | samples/s | trainable | ckpt MB |"
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header[1:-1].split("|")) + "|")
    for r in report["results"]:
        cells = " | ".join(f"{r['phases_ms'][p]:>12.1f}" for p in PHASES)
        print(f"| {r['data']:<7} | {r['vocabulary']:<5} | {cells} | {r['total_ms']:>6.1f} | "
              f"{100 * r['outside_unet_share']:>11.1f}% | {r['samples_per_s']:>9.1f} | "
              f"{r['trainable_parameters']:>9,} | {r['checkpoint_state_dict_mb']:>7.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="default: torch's default")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-train", type=int, default=1024, help="shapes images written and cached")
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides after experiment=quickstart")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*IterableDataset.*")
    report = run(args)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
