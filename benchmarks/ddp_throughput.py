"""Training throughput of the latent-diffusion step: 2-process DDP (gloo) vs 1 process, on this CPU.

The step is `LatentDiffusion.diffusion_losses` (frozen f=8 encoder, text conditioner, UNet, loss) +
backward + fused AdamW, the model built from the Hydra config (`experiment=ldm_f8_text size=tiny|small`)
with a randomly initialised first stage. Per-rank batch is fixed (weak scaling: DDP trains on twice the
samples per step). Threads per process are stated: 1 process x 1 thread, 1 process x 2 threads (the
whole machine for one process), 2 processes x 1 thread (the whole machine for DDP). Contenders alternate
in rounds so machine noise hits all alike; the median over rounds is reported.

    python benchmarks/ddp_throughput.py [--sizes tiny small] [--rounds 3] [--steps 10]
Writes benchmarks/results/ddp_throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RESOLUTION = 64  # f=8 latents of 8x8
CONTENDERS = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)


def build_model(size: str):
    """LatentDiffusion of `experiment=ldm_f8_text size=<size>` over a random stage-1 net of the same size."""
    import hydra

    overrides = [f"size={size}", f"data.resolution={RESOLUTION}"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        stage1 = compose(config_name="train", overrides=["experiment=ae_kl_f8", *overrides])
        stage2 = compose(config_name="train", overrides=["experiment=ldm_f8_text", *overrides])
    with open_dict(stage2):
        stage2.model.first_stage = OmegaConf.to_container(stage1.model.vae, resolve=True)
    return hydra.utils.instantiate(stage2.model)


def worker(rank: int, world_size: int, threads: int, size: str, batch_size: int, warmup: int, steps: int,
           port: int, queue) -> None:
    torch.set_num_threads(threads)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = build_model(size)
    model.set_scale_factor(0.18215)
    model.train()
    loss_fn = DiffusionLoss(model)
    step_module = torch.nn.parallel.DistributedDataParallel(loss_fn, forward_sync_buffers=False) if world_size > 1 \
        else loss_fn
    optimizer = torch.optim.AdamW(model.trainable.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(rank)
    batch = {"image": torch.rand(batch_size, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1,
             "caption": ["a red circle at the top left"] * batch_size}
    for index in range(warmup + steps):
        if index == warmup:
            if world_size > 1:
                dist.barrier()
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_module(batch).backward()
        optimizer.step()
    if world_size > 1:
        dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        queue.put(steps * batch_size * world_size / elapsed)
    if world_size > 1:
        dist.destroy_process_group()


class DiffusionLoss(torch.nn.Module):
    """The training loss as a module's forward, so DDP can wrap it (its parameters are the model's)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        losses, _ = self.model.diffusion_losses(batch, p_uncond=0.1)
        return losses.mean()


def measure(processes: int, threads: int, size: str, batch_size: int, warmup: int, steps: int) -> float:
    context = mp.get_context("spawn")
    queue = context.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [context.Process(target=worker, args=(rank, processes, threads, size, batch_size, warmup, steps, port,
                                                  queue)) for rank in range(processes)]
    for proc in procs:
        proc.start()
    result = queue.get(timeout=600)
    for proc in procs:
        proc.join(timeout=60)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    rows = []
    for size in args.sizes:
        samples: dict[tuple[int, int], list[float]] = {c: [] for c in CONTENDERS}
        for _ in range(args.rounds):
            for processes, threads in CONTENDERS:
                samples[(processes, threads)].append(
                    measure(processes, threads, size, args.batch_size, args.warmup, args.steps))
        baseline = statistics.median(samples[(1, 1)])
        for (processes, threads), values in samples.items():
            rate = statistics.median(values)
            rows.append({"size": size, "processes": processes, "threads_per_process": threads,
                         "batch_per_process": args.batch_size, "samples_per_s": round(rate, 2),
                         "speedup_vs_1x1": round(rate / baseline, 2), "rounds": values})
            print(f"{size:6s} {processes} proc x {threads} thr: {rate:8.2f} samples/s ({rate / baseline:.2f}x)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "load_average_1_5_15_min": os.getloadavg(),
            "backend": "gloo", "resolution": RESOLUTION,
            "step": "LatentDiffusion.diffusion_losses + backward + fused AdamW (ldm_f8_text)"}
    (RESULTS / "ddp_throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["| size | processes x threads | batch / process | samples/s | vs 1x1 |", "|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['processes']} x {r['threads_per_process']} | {r['batch_per_process']} | "
              f"{r['samples_per_s']} | {r['speedup_vs_1x1']}x |" for r in rows]
    (RESULTS / "ddp_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
