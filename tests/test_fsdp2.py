"""FSDP2 of a whole LatentDiffusion over 2 CPU processes (gloo): sharded UNet + text encoder, EMA over the
shards, the all-reduced non-finite check, sampling under full parameters, full and sharded checkpoints;
every result compared with one process training on the whole batch."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_distributed import run_ranks

from ldm.models.latent_diffusion import LatentDiffusion

TINY_MODEL = dict(
    unet=dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
              attention_resolutions=[2], num_head_channels=8, context_dim=16, norm_groups=8),
    conditioner={"_target_": "ldm.models.conditioners.TextTransformer", "width": 16, "layers": 1, "heads": 2},
    first_stage=dict(embed_dim=4, z_channels=4, ch=8, ch_mult=[1, 2], num_res_blocks=1, attention_resolutions=[],
                     norm_groups=4),
    image_size=16, scale_factor=0.5, ema_decay=0.5, learning_rate=1e-3, warmup_steps=0,
)
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a small red square"]
STEPS = 2


def problem():
    """The model, and per step a fixed full batch of noised latents, timesteps, targets and captions."""
    torch.manual_seed(0)
    model = LatentDiffusion(**TINY_MODEL)
    generator = torch.Generator().manual_seed(1)
    steps = [(torch.randn(4, 4, 8, 8, generator=generator), torch.randint(0, 1000, (4,), generator=generator),
              torch.randn(4, 4, 8, 8, generator=generator)) for _ in range(STEPS)]
    return model, steps


def train(model: LatentDiffusion, steps, part: slice, nan_on_rank: int | None = None) -> list[torch.Tensor]:
    """STEPS optimizer steps on `part` of each batch (+ one step whose gradients are NaN on one rank's shard)."""
    optimizer = model.configure_optimizers()["optimizer"]
    for z, t, target in steps:
        optimizer.zero_grad(set_to_none=True)
        cond = model.conditioning({"caption": CAPTIONS[part]}, None, latent_size=(8, 8))
        F.mse_loss(model(z[part], t[part], cond), target[part]).backward()
        model.on_before_optimizer_step(optimizer)
        optimizer.step()
        model.ema.update(model.trainable)
    if nan_on_rank is not None:  # a NaN in one rank's shard only: every rank must skip the step
        before = [p.detach().clone() for p in model.trainable.parameters()]
        optimizer.zero_grad(set_to_none=True)
        cond = model.conditioning({"caption": CAPTIONS[part]}, None, latent_size=(8, 8))
        F.mse_loss(model(steps[0][0][part], steps[0][1][part], cond), steps[0][2][part]).backward()
        import torch.distributed as dist

        if dist.get_rank() == nan_on_rank:
            grad = model.unet.out[-1].weight.grad
            grad._local_tensor.view(-1)[0] = float("nan")
        model.on_before_optimizer_step(optimizer)
        optimizer.step()
        return before
    return []


def worker(out_dir: str) -> None:
    """One rank (run in a subprocess by the test below)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    from ldm.models.sharding import shard_latent_diffusion

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, steps = problem()
    shard_latent_diffusion(model, init_device_mesh("cpu", (world,)))
    half = 4 // world
    before = train(model, steps, slice(rank * half, (rank + 1) * half), nan_on_rank=1)
    skipped = all(torch.equal(b, p.full_tensor()) for b, p in zip(
        [b.full_tensor() for b in before], model.trainable.parameters()))
    with model.ema_weights():
        images = model.generate(CAPTIONS[:2], steps=2, cfg_scale=2.0)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dcp.save({"model": model.state_dict()}, checkpoint_id=os.path.join(out_dir, "sharded"))
    fresh, _ = problem()
    shard_latent_diffusion(fresh, init_device_mesh("cpu", (world,)))
    state = {"model": fresh.state_dict()}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "sharded"))
    reloaded = get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"full": full, "reloaded": reloaded, "images": images, "skipped": skipped,
                    "sharded_ema": sum(type(b).__name__ == "DTensor" for b in model.ema.buffers())},
                   os.path.join(out_dir, "result.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_latent_diffusion_matches_one_process(tmp_path):
    run_ranks(f"import test_fsdp2 as t; t.worker({str(tmp_path)!r})")
    result = torch.load(Path(tmp_path) / "result.pt", weights_only=True)

    reference, steps = problem()
    train(reference, steps, slice(0, 4))
    with reference.ema_weights():
        images = reference.generate(CAPTIONS[:2], steps=2, cfg_scale=2.0)
    expected = reference.state_dict()
    assert result["sharded_ema"] > 0  # the shadows were sharded like their weights
    assert result["skipped"], "a NaN in one rank's gradient shard did not make every rank skip the step"
    assert set(result["full"]) == set(expected)  # full checkpoint: the eager key layout (loads anywhere)
    for name, value in expected.items():
        torch.testing.assert_close(result["full"][name], value, atol=2e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(result["reloaded"][name], result["full"][name], atol=0, rtol=0, msg=name)
    assert any(k.startswith("ema.") for k in expected)
    torch.testing.assert_close(result["images"], images, atol=1e-4, rtol=1e-4)
    eager = LatentDiffusion(**TINY_MODEL)
    eager.load_state_dict(result["full"])  # a sharded run's full checkpoint loads into an unsharded model
