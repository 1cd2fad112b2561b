"""Train-step speed and peak memory: ldm `UNetModel` vs diffusers `UNet2DConditionModel`.

Both nets get the same architecture (block widths 64/128, cross-attention on the first level and in
the middle block, 8 heads, context width 128, N res blocks per level), the same batch (8 latents of
4×16×16, 77 context tokens, fp32) and the same step: forward, MSE to a fixed target, backward, AdamW.
The contenders alternate in rounds inside one process so that machine noise hits both alike; the
median step time is reported.

Memory: on CUDA, `torch.cuda.max_memory_allocated` over one step. On CPU, the torch profiler's
allocator event stream (`profile_memory=True`: every tensor allocation and free, in order) over one
step after warm-up: the running sum's maximum is the step's peak tensor memory above its start, to
which we add the bytes held across steps (parameters and AdamW state). RSS is not used: glibc keeps
freed pages, so it measures the allocator, not the model.

    python benchmarks/unet_train_step.py [--threads 1] [--layers-per-block 1 2] [--rounds 8]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from ldm.nets.unet import UNetModel  # noqa: E402

WIDTHS = (64, 128)
HEADS = 8
CONTEXT_DIM = 128
CONTEXT_TOKENS = 77
LATENT_CHANNELS = 4


def build_ours(layers_per_block: int) -> torch.nn.Module:
    return UNetModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, model_channels=WIDTHS[0],
        channel_mult=[w // WIDTHS[0] for w in WIDTHS], num_res_blocks=layers_per_block,
        attention_resolutions=[1], num_heads=HEADS, context_dim=CONTEXT_DIM,
    )


def build_diffusers(layers_per_block: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return DiffusersCallAdapter(UNet2DConditionModel(
        sample_size=16, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=WIDTHS, layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=HEADS,  # diffusers' legacy name: the head count
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
    ))


class DiffusersCallAdapter(torch.nn.Module):
    """Gives the diffusers UNet our call signature `(x, t, context) -> tensor`."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, encoder_hidden_states=context, return_dict=False)[0]


CONTENDERS: dict[str, Callable[[int], torch.nn.Module]] = {"ldm": build_ours, "diffusers": build_diffusers}


class TrainStep:
    """One contender: a net, its AdamW and a fixed batch."""

    def __init__(self, net: torch.nn.Module, batch_size: int, size: int, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(0)
        self.net = net.to(device).train()
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-4)
        self.x = torch.randn(batch_size, LATENT_CHANNELS, size, size, generator=generator).to(device)
        self.target = torch.randn(self.x.shape, generator=generator).to(device)
        self.t = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
        self.context = torch.randn(batch_size, CONTEXT_TOKENS, CONTEXT_DIM, generator=generator).to(device)
        self.device = device

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        F.mse_loss(self.net(self.x, self.t, self.context), self.target).backward()
        self.optimizer.step()

    def timed(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            self._sync()
            start = time.perf_counter()
            self()
            self._sync()
            times.append(time.perf_counter() - start)
        return times

    def peak_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self()
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
        running, peak = 0, 0
        for _, nbytes in events:
            running += nbytes
            peak = max(peak, running)
        return peak + self._persistent_bytes()

    def _persistent_bytes(self) -> int:
        tensors = list(self.net.parameters()) + [
            v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    results = []
    for layers in args.layers_per_block:
        steps = {}
        for name, build in CONTENDERS.items():
            torch.manual_seed(0)
            steps[name] = TrainStep(build(layers), args.batch_size, args.size, device)
        for step in steps.values():  # warm-up: first-call allocations, AdamW state
            step.timed(args.warmup)
        times: dict[str, list[float]] = {name: [] for name in steps}
        for round_index in range(args.rounds):
            order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
            for name in order:
                times[name] += steps[name].timed(args.steps_per_round)
        for name, step in steps.items():
            median = statistics.median(times[name])
            results.append(dict(
                contender=name, layers_per_block=layers,
                parameters=sum(p.numel() for p in step.net.parameters()),
                median_step_ms=1e3 * median, samples_per_s=args.batch_size / median,
                peak_memory_mb=step.peak_memory_bytes() / 2**20,
            ))
    return dict(
        setup=dict(
            device=str(device), threads=torch.get_num_threads(), batch_size=args.batch_size,
            latent=[LATENT_CHANNELS, args.size, args.size], widths=list(WIDTHS), heads=HEADS,
            context=[CONTEXT_TOKENS, CONTEXT_DIM], dtype="float32", rounds=args.rounds,
            steps_per_round=args.steps_per_round, torch=torch.__version__,
            memory_method="cuda max_memory_allocated" if device.type == "cuda"
            else "torch.profiler allocator events: peak over one step + parameters + AdamW state",
        ),
        results=results,
        ratios=_ratios(results),
    )


def _ratios(results: list[dict]) -> list[dict]:
    by_key = {(r["contender"], r["layers_per_block"]): r for r in results}
    ratios = []
    for layers in sorted({r["layers_per_block"] for r in results}):
        ours, peer = by_key[("ldm", layers)], by_key[("diffusers", layers)]
        ratios.append(dict(
            layers_per_block=layers,
            speed_ldm_over_diffusers=ours["samples_per_s"] / peer["samples_per_s"],
            memory_ldm_over_diffusers=ours["peak_memory_mb"] / peer["peak_memory_mb"],
        ))
    return ratios


def print_table(report: dict) -> None:
    setup = report["setup"]
    print(f"device={setup['device']} threads={setup['threads']} batch={setup['batch_size']} "
          f"latent={setup['latent']} fp32; memory: {setup['memory_method']}")
    print(f"| {'contender':<10} | layers | {'params':>9} | step ms | samples/s | peak MB |")
    print("|------------|--------|-----------|---------|-----------|---------|")
    for r in report["results"]:
        print(f"| {r['contender']:<10} | {r['layers_per_block']:>6} | {r['parameters']:>9,} | "
              f"{r['median_step_ms']:>7.1f} | {r['samples_per_s']:>9.2f} | {r['peak_memory_mb']:>7.1f} |")
    for ratio in report["ratios"]:
        print(f"layers={ratio['layers_per_block']}: speed ldm/diffusers = {ratio['speed_ldm_over_diffusers']:.3f}, "
              f"memory ldm/diffusers = {ratio['memory_ldm_over_diffusers']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--layers-per-block", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "unet_train_step.json")
    args = parser.parse_args()
    report = run(args)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
