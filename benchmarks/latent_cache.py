"""Stage-2 training throughput from images vs from cached latents (256 px, f = 8, CPU-sized networks).

Both contenders run the same full training step on the same samples: the DataModule's next batch (decode
and crop a PNG, or read two .npy arrays), the latent (encode with the frozen f=8 autoencoder, or
mean + std * eps from the cache), the text conditioner, the UNet forward and backward, an AdamW step.
Only where the latent comes from differs. Networks are the `size=small` presets of ae_kl_f8 and ldm_f8_text
(random weights: speed does not depend on them); the frozen autoencoder is measured at the `small` preset and
at the paper's widths (ch 128, 2 res blocks: a released first stage beside a CPU-sized UNet is common, and the
reason to cache). The contenders alternate in rounds inside one process so
machine noise hits both alike; the median samples/s per contender is reported, with the one-off cost of
writing the cache.

    python benchmarks/latent_cache.py [--threads 1] [--batch-size 8] [--steps 4] [--rounds 3]
                                      [--autoencoders small paper]

Writes benchmarks/results/latent_cache.json and latent_cache.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ldm.data.latent_cache import LatentDataModule  # noqa: E402
from ldm.data.shapes import write_shapes  # noqa: E402
from ldm.data.webdataset import WebDataModule  # noqa: E402
from ldm.inference.latent_cache import encode_latents  # noqa: E402
from ldm.loading.checkpoints import build_latent_diffusion  # noqa: E402
from ldm.models.latent_diffusion import LatentDiffusion  # noqa: E402
from ldm.nets.vae import AutoencoderNet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RESOLUTION = 256
# configs/experiment/ae_kl_f8.yaml at size=small (size_model/small_autoencoder.yaml) and at the paper's widths
AUTOENCODERS = {
    "small": dict(embed_dim=4, z_channels=4, ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=1, attention_resolutions=[],
                  norm_groups=32),
    "paper": dict(embed_dim=4, z_channels=4, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attention_resolutions=[],
                  norm_groups=32),
}
# configs/experiment/ldm_f8_text.yaml + size_model/small_latent_diffusion.yaml + size/small.yaml
UNET = dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=[1, 2, 4, 4], num_res_blocks=1,
            attention_resolutions=[4, 2, 1], num_heads=4, transformer_depth=1, context_dim=128, norm_groups=32)
TEXT = {"_target_": "ldm.models.conditioners.TextTransformer", "width": 128, "layers": 2, "heads": 4}


def train_steps(model: LatentDiffusion, loader: torch.utils.data.DataLoader, steps: int) -> Callable[[], int]:
    """A callable running `steps` full training steps (data included); returns the samples trained on."""
    optimizer = torch.optim.AdamW(model.trainable.parameters(), lr=1e-4)

    def run() -> int:
        samples, batches = 0, iter(loader)
        for _ in range(steps):
            batch = next(batches)
            losses, _ = model.diffusion_losses(batch, p_uncond=0.1)
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            optimizer.step()
            samples += len(batch["key"])
        return samples
    return run


def measure(contenders: dict[str, Callable[[], int]], rounds: int) -> dict[str, float]:
    """Median samples/s per contender, alternating in each round after one warm-up run each."""
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for run in contenders.values():
        run()
    for _ in range(rounds):
        for name, run in contenders.items():
            start = time.perf_counter()
            samples = run()
            rates[name].append(samples / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def compare(autoencoder: dict, tmp: str, batch_size: int, steps: int, rounds: int) -> dict:
    """Write shards and a cache with this autoencoder, then time both contenders."""
    num_samples = batch_size * steps * 2  # two shards; a timed run reads the first `steps` batches
    urls = write_shapes(os.path.join(tmp, "shapes"), resolution=RESOLUTION, num_train=num_samples, num_val=0,
                        samples_per_shard=num_samples // 2)["train"]
    ae_ckpt = os.path.join(tmp, "ae_kl_f8.ckpt")
    vae = AutoencoderNet(**autoencoder)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()},
                "hyper_parameters": {"vae": autoencoder}}, ae_ckpt)
    images = WebDataModule(urls, resolution=RESOLUTION, batch_size=batch_size, num_workers=0, shuffle_buffer=0)
    start = time.perf_counter()
    encode_latents(ae_ckpt, images, os.path.join(tmp, "cache"), batch_size=batch_size, splits=("train",))
    encode_seconds = time.perf_counter() - start
    latents = LatentDataModule(os.path.join(tmp, "cache"), resolution=RESOLUTION, batch_size=batch_size,
                               num_workers=0, shuffle_buffer=0)
    model = build_latent_diffusion(dict(unet=UNET, conditioner=TEXT, first_stage_ckpt=ae_ckpt, image_size=RESOLUTION,
                                        scale_factor=1.0, ema_decay=0.0))
    latents.check_first_stage(model.first_stage, ae_ckpt)
    rates = measure({"images": train_steps(model, images.train_dataloader(), steps),
                     "cached latents": train_steps(model, latents.train_dataloader(), steps)}, rounds)
    return {"autoencoder": autoencoder, "samples_per_second": rates,
            "speedup": rates["cached latents"] / rates["images"], "cache_write_seconds": encode_seconds,
            "cache_write_samples": num_samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="training steps per timed run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--autoencoders", nargs="+", choices=sorted(AUTOENCODERS), default=["small", "paper"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs = {}
    for name in args.autoencoders:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs[name] = compare(AUTOENCODERS[name], tmp, args.batch_size, args.steps, args.rounds)
    result = {"resolution": RESOLUTION, "factor": 8, "batch_size": args.batch_size, "threads": args.threads,
              "cpu_count": os.cpu_count(), "steps_per_run": args.steps, "rounds": args.rounds, "unet": UNET,
              "autoencoders": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latent_cache.json").write_text(json.dumps(result, indent=1))
    table = ["| frozen f=8 autoencoder | from images (samples/s) | from cached latents (samples/s) | speed-up | "
             "writing the cache |", "|---|---|---|---|---|"]
    for name, run in runs.items():
        rates = run["samples_per_second"]
        table.append(f"| {name} (ch {run['autoencoder']['ch']}, {run['autoencoder']['num_res_blocks']} res blocks) | "
                     f"{rates['images']:.2f} | {rates['cached latents']:.2f} | {run['speedup']:.2f}x | "
                     f"{run['cache_write_seconds']:.1f} s / {run['cache_write_samples']} samples |")
    table += ["", "Full stage-2 training step (data, latent, text encoder, UNet size=small fwd + bwd, AdamW) at "
              f"256 px, batch {args.batch_size}, {args.threads} thread(s), median of {args.rounds} alternating rounds."]
    (RESULTS / "latent_cache.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))

if __name__ == "__main__":
    main()
