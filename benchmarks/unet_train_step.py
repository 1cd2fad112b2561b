"""Train-step speed and peak memory: ldm `UNetModel` vs diffusers `UNet2DConditionModel`, eager and compiled.

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

Compiled: `nn.Module.compile(mode=--compile-mode)` of the same net (the path of `model.compile=true`); its
cold-compile time is the wall time of its first two steps (forward+backward graphs, AdamW) minus two warm
steps. Efficiency: FLOPs of one step from `torch.utils.flop_counter` (its table lacks the CPU SDPA kernels
`_scaled_dot_product_flash_attention_for_cpu[_backward]`: registered here with the formulas of the other
SDPA kernels) over the step time, as a share of the sgemm limit measured on this machine (a square fp32
matmul at the same thread count; AdamW's element-wise work counts zero FLOPs). "% in kernels": the share of
one profiled step's operator self time inside conv / GEMM / attention kernels (KERNEL_OPS), i.e. how close the
step is to the time of its own compute kernels; the rest is what fusing the element-wise ops could remove.

    python benchmarks/unet_train_step.py [--threads 1] [--layers-per-block 1 2] [--rounds 8] [--modes eager compiled]
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
from torch.utils.flop_counter import (  # noqa: E402
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from ldm.nets.unet import UNetModel  # noqa: E402

# The compute kernels of a UNet step: convolutions, matmuls and attention (forward and backward). Everything
# else (GroupNorm, SiLU, adds, copies, AdamW) is element-wise work a compiler could fuse away at best.
KERNEL_OPS = frozenset({
    "aten::mkldnn_convolution", "aten::convolution_backward", "aten::cudnn_convolution", "aten::mm", "aten::addmm",
    "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_backward", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_efficient_attention_backward",
})
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
aten = torch.ops.aten


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def step_flops(step: "TrainStep") -> int:
    """FLOPs of one forward + backward (flop_counter's table, CPU SDPA registered above)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step.optimizer.zero_grad(set_to_none=True)
        F.mse_loss(step.net(step.x, step.t, step.context), step.target).backward()
    return counter.get_total_flops()


def sgemm_limit_flops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a square fp32 matmul (2 n^3 FLOPs), best of `repeats`: the rate conv + GEMM can reach."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class TrainStep:
    """One contender: a net, its AdamW and a fixed batch."""

    def __init__(self, net: torch.nn.Module, batch_size: int, size: int, device: torch.device,
                 compile_mode: str | None = None) -> None:
        generator = torch.Generator().manual_seed(0)
        self.net = net.to(device).train()
        self.flops = 0
        self.compile_seconds = 0.0
        if compile_mode is not None:
            self.net.compile(mode=compile_mode)
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

    def kernel_time_share(self) -> float:
        """Share of one step's operator self time spent in the conv / GEMM / attention kernels (the profiler's
        self CPU times, or CUDA times on a GPU): the step time a net built from these kernels could reach if
        every element-wise op, copy and optimizer update were free, as a fraction of what it takes."""
        activities = [ProfilerActivity.CUDA] if self.device.type == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            self()
            self._sync()
        totals = prof.key_averages()
        attribute = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        total = sum(getattr(e, attribute) for e in totals)
        kernels = sum(getattr(e, attribute) for e in totals if e.key in KERNEL_OPS)
        return kernels / total if total else float("nan")

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
    limit = sgemm_limit_flops(device)
    results = []
    for layers in args.layers_per_block:
        steps = {}
        for name, build in CONTENDERS.items():
            for mode in args.modes:
                torch.manual_seed(0)
                eager = TrainStep(build(layers), args.batch_size, args.size, device)
                eager.flops = step_flops(eager)  # counted eagerly: the compiled net does the same arithmetic
                if mode == "eager":
                    steps[(name, mode)] = eager
                    continue
                torch.manual_seed(0)
                compiled = TrainStep(build(layers), args.batch_size, args.size, device, args.compile_mode)
                compiled.flops = eager.flops
                cold = sum(compiled.timed(2))
                compiled.compile_seconds = max(0.0, cold - sum(compiled.timed(2)))
                steps[(name, mode)] = compiled
        for step in steps.values():  # warm-up: first-call allocations, AdamW state
            step.timed(args.warmup)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
        for round_index in range(args.rounds):
            order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
            for name in order:
                times[name] += steps[name].timed(args.steps_per_round)
        for (name, mode), step in steps.items():
            median = statistics.median(times[(name, mode)])
            results.append(dict(
                contender=name, mode=mode, layers_per_block=layers,
                parameters=sum(p.numel() for p in step.net.parameters()),
                median_step_ms=1e3 * median, samples_per_s=args.batch_size / median,
                peak_memory_mb=step.peak_memory_bytes() / 2**20,
                gflop_per_step=step.flops / 1e9, percent_of_sgemm_limit=100 * step.flops / median / limit,
                percent_in_kernels=100 * step.kernel_time_share(),
                cold_compile_s=step.compile_seconds,
            ))
    return dict(
        setup=dict(
            device=str(device), threads=torch.get_num_threads(), batch_size=args.batch_size,
            latent=[LATENT_CHANNELS, args.size, args.size], widths=list(WIDTHS), heads=HEADS,
            context=[CONTEXT_TOKENS, CONTEXT_DIM], dtype="float32", rounds=args.rounds,
            steps_per_round=args.steps_per_round, torch=torch.__version__, modes=list(args.modes),
            compile_mode=args.compile_mode, sgemm_limit_gflops=limit / 1e9,
            memory_method="cuda max_memory_allocated" if device.type == "cuda"
            else "torch.profiler allocator events: peak over one step + parameters + AdamW state",
        ),
        results=results,
        ratios=_ratios(results),
    )


def _ratios(results: list[dict]) -> list[dict]:
    """ldm / diffusers per mode, and compiled / eager per contender (speed-ups: > 1 is faster)."""
    by_key = {(r["contender"], r["mode"], r["layers_per_block"]): r for r in results}
    ratios = []
    for layers in sorted({r["layers_per_block"] for r in results}):
        for mode in sorted({r["mode"] for r in results}):
            ours, peer = by_key[("ldm", mode, layers)], by_key[("diffusers", mode, layers)]
            ratios.append(dict(
                layers_per_block=layers, mode=mode,
                speed_ldm_over_diffusers=ours["samples_per_s"] / peer["samples_per_s"],
                memory_ldm_over_diffusers=ours["peak_memory_mb"] / peer["peak_memory_mb"],
            ))
        for name in CONTENDERS:
            if (name, "compiled", layers) in by_key and (name, "eager", layers) in by_key:
                ratios.append(dict(layers_per_block=layers, contender=name, speed_compiled_over_eager=(
                    by_key[(name, "compiled", layers)]["samples_per_s"] / by_key[(name, "eager", layers)]["samples_per_s"])))
    return ratios


def print_table(report: dict) -> None:
    setup = report["setup"]
    print(f"device={setup['device']} threads={setup['threads']} batch={setup['batch_size']} "
          f"latent={setup['latent']} fp32; sgemm limit {setup['sgemm_limit_gflops']:.1f} GFLOP/s; "
          f"memory: {setup['memory_method']}")
    print(f"| {'contender':<10} | mode     | layers | {'params':>9} | step ms | samples/s | peak MB | GFLOP | "
          "% sgemm | % in kernels | compile s |")
    print("|------------|----------|--------|-----------|---------|-----------|---------|-------|---------|"
          "--------------|-----------|")
    for r in report["results"]:
        print(f"| {r['contender']:<10} | {r['mode']:<8} | {r['layers_per_block']:>6} | {r['parameters']:>9,} | "
              f"{r['median_step_ms']:>7.1f} | {r['samples_per_s']:>9.2f} | {r['peak_memory_mb']:>7.1f} | "
              f"{r['gflop_per_step']:>5.2f} | {r['percent_of_sgemm_limit']:>6.1f}% | {r['percent_in_kernels']:>11.1f}% | "
              f"{r['cold_compile_s']:>9.1f} |")
    for ratio in report["ratios"]:
        if "speed_compiled_over_eager" in ratio:
            print(f"layers={ratio['layers_per_block']} {ratio['contender']}: speed compiled/eager = "
                  f"{ratio['speed_compiled_over_eager']:.3f}")
        else:
            print(f"layers={ratio['layers_per_block']} {ratio['mode']}: speed ldm/diffusers = "
                  f"{ratio['speed_ldm_over_diffusers']:.3f}, memory ldm/diffusers = {ratio['memory_ldm_over_diffusers']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--layers-per-block", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled nets")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "unet_train_step.json")
    args = parser.parse_args()
    report = run(args)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
