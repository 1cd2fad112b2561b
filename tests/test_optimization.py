"""Stage 2's optimizer and LR schedule come from config: the default is CompVis' AdamW + linear warm-up then
constant, unchanged; cosine / linear decay follow their formulas; `model/optimizer=sgd` switches the optimizer."""
import math
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.models.latent_diffusion import LatentDiffusion
from ldm.models.optimization import build_optimizer, lr_multiplier

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
FIRST_STAGE = dict(embed_dim=4, z_channels=4, ch=8, ch_mult=[1], num_res_blocks=1, norm_groups=4)
UNET = dict(model_channels=8, channel_mult=[1], num_res_blocks=1, attention_resolutions=[], norm_groups=4, num_heads=1)
NONE = {"_target_": "ldm.models.conditioners.NullConditioner"}


def tiny_model(**kwargs) -> LatentDiffusion:
    return LatentDiffusion(unet=UNET, conditioner=NONE, first_stage=FIRST_STAGE, image_size=8, scale_factor=1.0,
                           ema_decay=0.0, learning_rate=0.1, **kwargs)


def rates(model: LatentDiffusion, steps: int) -> list[float]:
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_default_is_adamw_with_warmup_then_constant_as_before():
    model = tiny_model(warmup_steps=4, weight_decay=0.01)
    optimizer = model.configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["weight_decay"] == 0.01
    assert optimizer.defaults["fused"] is True
    # the schedule before it was configurable: min(1, (step + 1) / warmup)
    assert rates(model, 7) == [0.1 * min(1.0, (s + 1) / 4) for s in range(7)]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decaying_schedules_follow_their_formula(schedule):
    warmup, total, r = 3, 13, 0.1
    model = tiny_model(warmup_steps=warmup, lr_schedule=schedule, lr_decay_steps=total, min_lr_ratio=r)
    got = rates(model, 16)
    for step, lr in enumerate(got):
        if step + 1 < warmup:
            expected = (step + 1) / warmup
        else:
            p = min(1.0, (step + 1 - warmup) / (total - warmup))
            shape = 1 - p if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * p))
            expected = r + (1 - r) * shape
        assert lr == pytest.approx(0.1 * expected, rel=1e-12), step
    assert got[warmup - 1] == pytest.approx(0.1) and got[total - 1] == pytest.approx(0.1 * r)
    assert got[-1] == pytest.approx(0.1 * r)  # after lr_decay_steps it stays at the floor
    assert lr_multiplier(7, "cosine", 3, 13) == pytest.approx(0.5)  # half-way (p = 0.5): cos(pi/2) = 0


def test_bad_schedule_settings_are_clear_errors():
    with pytest.raises(ValueError, match="model.lr_schedule='cosin' is unknown: use one of constant, linear, cosine"):
        tiny_model(lr_schedule="cosin")
    with pytest.raises(ValueError, match="must exceed warmup_steps=5: got None"):
        tiny_model(warmup_steps=5, lr_schedule="cosine").configure_optimizers()  # no trainer, no lr_decay_steps
    with pytest.raises(ValueError, match="must be a partial"):
        build_optimizer({"_target_": "torch.optim.SGD"}, [torch.nn.Parameter(torch.zeros(1))], 0.1)


def compose_model(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=ldm_f8_text", *overrides]).model


def test_the_optimizer_is_a_config_group_and_sgd_is_one_override_away():
    params = [torch.nn.Parameter(torch.zeros(2))]
    adamw = build_optimizer(compose_model("model.weight_decay=0.05").optimizer, params, lr=1e-4)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.05
    cfg = compose_model("model/optimizer=sgd", "model.lr_schedule=cosine", "model.optimizer.momentum=0.8")
    sgd = build_optimizer(cfg.optimizer, params, lr=0.5)
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["lr"] == 0.5 and sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] is True
    assert cfg.lr_schedule == "cosine"
    # through the module, as train.py builds it
    model = tiny_model(optimizer=dict(cfg.optimizer), lr_schedule="linear", lr_decay_steps=4, warmup_steps=0)
    assert type(model.configure_optimizers()["optimizer"]) is torch.optim.SGD
    assert rates(model, 4) == pytest.approx([0.1 * 0.75, 0.1 * 0.5, 0.1 * 0.25, 0.0])
