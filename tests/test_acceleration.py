"""Speed switches of LatentDiffusion (ldm/models/acceleration.py) on CPU: torch.compile in place (checkpoint
layout, EMA, DDP, sampling, `_orig_mod.` keys), bf16 frozen towers under bf16 autocast, channels_last, the SDPA
kernel choice and TF32; each against the eager fp32 model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_distributed import free_port
from test_fsdp2 import CAPTIONS, TINY_MODEL

from ldm.models.acceleration import COMPILED_PREFIX, is_compiled
from ldm.models.latent_diffusion import LatentDiffusion


def build(**switches) -> LatentDiffusion:
    torch.manual_seed(0)
    return LatentDiffusion(**TINY_MODEL, **switches)


def batch() -> dict:
    generator = torch.Generator().manual_seed(3)
    return {"image": torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1, "caption": CAPTIONS}


def train_step(model: LatentDiffusion, net=None) -> torch.Tensor:
    """One step: losses from a fixed generator, AdamW (fused, guarded), EMA; returns the loss."""
    optimizer = model.configure_optimizers()["optimizer"]
    generator = torch.Generator().manual_seed(5)
    latents = model.batch_latents(batch(), generator) * model.scale_factor
    cond = model.conditioning(batch(), None, latent_size=latents.shape[-2:])
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, 1000, (4,), generator=generator)
    z_t = model.schedule.q_sample(latents, t, noise)
    loss = F.mse_loss((net or model)(z_t, t, cond), noise)
    loss.backward()
    model.on_before_optimizer_step(optimizer)
    optimizer.step()
    model.ema.update(model.trainable)
    return loss.detach()


@pytest.mark.slow
def test_compiled_model_keeps_layout_trains_samples_and_loads_either_way():
    """aot_eager traces the graphs torch.compile runs (inductor only swaps the kernels, minutes to build here)."""
    eager, compiled = build(), build(compile=True, compile_backend="aot_eager")
    assert is_compiled(compiled.unet) and is_compiled(compiled.first_stage.encoder)
    assert is_compiled(compiled.conditioner.transformer) and not is_compiled(eager.unet)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no `_orig_mod.`: same checkpoint files
    torch.testing.assert_close(train_step(compiled), train_step(eager), atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)  # weights and EMA after the step
    with compiled.ema_weights(), eager.ema_weights():
        torch.testing.assert_close(compiled.generate(CAPTIONS[:2], steps=2, cfg_scale=2.0),
                                   eager.generate(CAPTIONS[:2], steps=2, cfg_scale=2.0), atol=1e-4, rtol=1e-4)

    checkpoint = {"state_dict": {f"unet.{COMPILED_PREFIX}{k[5:]}" if k.startswith("unet.") else k: v
                                 for k, v in compiled.state_dict().items()}}  # as a torch.compile wrapper writes
    compiled.on_save_checkpoint(checkpoint)
    assert not any(COMPILED_PREFIX in key for key in checkpoint["state_dict"])
    wrapped = {f"unet.{COMPILED_PREFIX}{k[5:]}" if k.startswith("unet.") else k: v
               for k, v in eager.state_dict().items()}
    fresh = build(compile=True, compile_backend="aot_eager")
    fresh.load_state_dict(wrapped)  # a wrapper's keys load, into compiled and eager models alike
    build().load_state_dict(compiled.state_dict())
    torch.testing.assert_close(fresh.unet.out[-1].weight, eager.unet.out[-1].weight, atol=0, rtol=0)


def test_compiled_model_under_ddp():
    """DDP (1 process, gloo) around a model with compiled nets: gradients reach the compiled UNet's weights."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = build(compile=True, compile_backend="aot_eager")
        reference = build()
        loss = train_step(model, net=DistributedDataParallel(model))
        torch.testing.assert_close(loss, train_step(reference), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.unet.out[-1].weight, reference.unet.out[-1].weight, atol=1e-5, rtol=1e-4)
    finally:
        dist.destroy_process_group()


def test_bf16_frozen_towers_under_bf16_autocast():
    fp32, bf16 = build(), build(frozen_dtype="bfloat16")
    assert bf16.first_stage.encoder.conv_in.weight.dtype == torch.bfloat16
    assert bf16.unet.out[-1].weight.dtype == torch.float32  # the trained nets keep fp32 master weights
    assert bf16.state_dict()["first_stage.encoder.conv_in.weight"].dtype == torch.float32  # checkpoints alike
    images = batch()["image"]
    mean32, mean16 = fp32.first_stage.encode(images).mean, bf16.first_stage.encode(images).mean
    assert mean16.dtype == torch.float32
    torch.testing.assert_close(mean16, mean32, atol=3e-2, rtol=3e-2)
    decoded = bf16.decode(mean16)
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, fp32.decode(mean32), atol=5e-2, rtol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, _ = bf16.diffusion_losses(batch(), generator=torch.Generator().manual_seed(0))
        reference, _ = fp32.diffusion_losses(batch(), generator=torch.Generator().manual_seed(0))
    losses.mean().backward()
    assert torch.isfinite(losses).all() and bf16.unet.out[-1].weight.grad is not None
    torch.testing.assert_close(losses.float(), reference.float(), atol=5e-2, rtol=5e-2)
    build().load_state_dict(bf16.state_dict())
    with pytest.raises(ValueError, match="frozen_dtype"):
        build(frozen_dtype="bf16")


def test_channels_last_and_sdpa_kernel_choice_leave_outputs_alone():
    eager = build().eval()
    generator = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 900])
    cond = eager.conditioning({"caption": CAPTIONS[:2]}, None, latent_size=(8, 8))
    expected = eager(z, t, cond)
    nhwc = build(channels_last=True).eval()
    assert nhwc.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc(z, t, cond), expected, atol=1e-5, rtol=1e-4)
    for backend in ("flash", "math"):  # the CPU flash kernel and the reference formula
        torch.testing.assert_close(build(sdpa_backend=backend).eval()(z, t, cond), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError):  # a kernel this device lacks is an error, not a silent fallback
        build(sdpa_backend="efficient").eval()(z, t, cond)
    with pytest.raises(ValueError, match="sdpa_backend"):
        build(sdpa_backend="flash2")
    with pytest.raises(ValueError, match="compile_mode"):
        build(compile_mode="fast")


def test_tf32_switch():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("highest")
        build()
        assert torch.get_float32_matmul_precision() == "highest"  # off: the user's setting is untouched
        build(allow_tf32=True)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def test_deepcopy_of_compiled_model_keeps_its_weights():
    """Lightning and EMA code copy modules: a compiled model copies like an eager one."""
    model = build(compile=True, compile_backend="aot_eager")
    twin = copy.deepcopy(model)
    assert list(twin.state_dict()) == list(model.state_dict())
