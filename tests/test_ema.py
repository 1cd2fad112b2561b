"""EMA: the update formula by hand, LitEma's warm-up, swap/restore, and where the averages live."""
import pytest
import torch
from torch import nn

from ldm.models.ema import EMA


def _set(module: nn.Linear, value: float) -> None:
    with torch.no_grad():
        module.weight.fill_(value)
        module.bias.fill_(value)


def test_update_matches_hand_computation_without_warmup():
    model = nn.Linear(3, 2)
    _set(model, 1.0)
    ema = EMA(model, decay=0.9, warmup=False)
    _set(model, 3.0)
    ema.update(model)  # 0.9 * 1 + 0.1 * 3
    torch.testing.assert_close(ema.weight, torch.full((2, 3), 1.2))
    _set(model, -1.0)
    ema.update(model)  # 0.9 * 1.2 + 0.1 * -1
    torch.testing.assert_close(ema.bias, torch.full((2,), 0.98))
    assert int(ema.num_updates) == 2


def test_warmup_follows_litema_rule():
    """decay_n = min(decay, (1 + n) / (10 + n)): 2/11 at the first update, 3/12 at the second."""
    model = nn.Linear(2, 2)
    _set(model, 0.0)
    ema = EMA(model, decay=0.999)
    _set(model, 11.0)
    ema.update(model)
    expected = 2 / 11 * 0.0 + 9 / 11 * 11.0
    torch.testing.assert_close(ema.bias, torch.full((2,), expected))
    _set(model, 0.0)
    ema.update(model)
    torch.testing.assert_close(ema.bias, torch.full((2,), 3 / 12 * expected))


def test_warmup_is_capped_by_decay():
    model = nn.Linear(1, 1)
    ema = EMA(model, decay=0.5)
    ema.num_updates.fill_(1000)  # (1 + n) / (10 + n) ~ 0.99 > 0.5: decay 0.5 applies
    before = ema.bias.clone()
    _set(model, 2.0)
    ema.update(model)
    torch.testing.assert_close(ema.bias, 0.5 * before + 1.0)


def test_swap_puts_averages_in_and_restores_weights_even_on_error():
    model = nn.Linear(4, 4)
    ema = EMA(model, decay=0.9, warmup=False)
    _set(model, 5.0)
    ema.update(model)
    trained = model.weight.detach().clone()
    with ema.swap(model):
        torch.testing.assert_close(model.weight, ema.weight)
        assert not torch.equal(model.weight, trained)
    assert torch.equal(model.weight, trained)
    with pytest.raises(RuntimeError, match="boom"), ema.swap(model):
        raise RuntimeError("boom")
    assert torch.equal(model.weight, trained)


def test_copy_to_overwrites_the_model():
    model = nn.Linear(2, 3)
    ema = EMA(model, decay=0.9)
    _set(model, 7.0)
    ema.copy_to(model)
    torch.testing.assert_close(model.weight, ema.weight)


def test_averages_live_in_the_owner_state_dict_not_in_its_parameters():
    """An owner (the LightningModule) checkpoints the averages, moves them, and never optimises them."""
    unet, conditioner, frozen = nn.Linear(2, 2), nn.Embedding(4, 2), nn.Linear(2, 2).requires_grad_(False)
    trainable = nn.ModuleDict({"unet": unet, "conditioner": conditioner, "frozen": frozen})
    owner = nn.Module()
    owner.net, owner.ema = trainable, EMA(trainable)
    keys = {k for k in owner.state_dict() if k.startswith("ema.")}
    # LitEma's layout: parameter names without dots; frozen weights are not averaged
    assert keys == {"ema.unetweight", "ema.unetbias", "ema.conditionerweight", "ema.num_updates"}
    assert list(owner.ema.parameters()) == []
    owner.to(torch.float64)
    assert owner.ema.unetweight.dtype == torch.float64  # buffers follow .to()

    restored = EMA(trainable)
    owner.ema.update(trainable)
    restored.load_state_dict(owner.ema.state_dict())
    assert torch.equal(restored.unetweight, owner.ema.unetweight) and int(restored.num_updates) == 1


def test_a_different_model_is_rejected():
    ema = EMA(nn.ModuleDict({"unet": nn.Linear(2, 2)}))
    with pytest.raises(KeyError, match="unet.weight"):
        ema.update(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        EMA(nn.Linear(2, 2), decay=1.5)
