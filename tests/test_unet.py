"""Behaviour of the UNet and its attention: shapes per autoencoder factor, conditioning paths,
gradient checkpointing, bf16 autocast, input errors, SDPA against the textbook formula."""
import math

import pytest
import torch

from ldm.nets.attention import (
    POSITION_BANDS,
    Attention,
    AttnBlock,
    spatial_positional_embedding,
)
from ldm.nets.unet import UNetModel

BATCH = 2


def tiny_unet(**overrides) -> UNetModel:
    settings = dict(
        in_channels=4, out_channels=4, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
        attention_resolutions=[2], num_heads=2, context_dim=8, norm_groups=8,
    )
    settings.update(overrides)
    torch.manual_seed(0)
    return perturb(UNetModel(**settings))


def perturb(module: torch.nn.Module) -> torch.nn.Module:
    """Add noise to every weight so that zero-initialised layers (proj_out, out.2, ...) are active."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return module


def inputs(channels: int = 4, size: int = 8, context_dim: int | None = 8, seed: int = 2) -> dict:
    generator = torch.Generator().manual_seed(seed)
    batch = dict(
        x=torch.randn(BATCH, channels, size, size, generator=generator),
        timesteps=torch.tensor([3, 900]),
    )
    if context_dim is not None:
        batch["context"] = torch.randn(BATCH, 5, context_dim, generator=generator)
    return batch


@pytest.mark.parametrize(
    "channels, size, channel_mult, attention_resolutions",
    [(3, 16, [1, 2, 2], [2, 4]), (4, 8, [1, 2], [2]), (16, 4, [1, 2], [1])],
    ids=["f4", "f8", "f16"],
)
def test_output_shape_equals_latent_shape(channels, size, channel_mult, attention_resolutions):
    unet = tiny_unet(
        in_channels=channels, out_channels=channels, channel_mult=channel_mult,
        attention_resolutions=attention_resolutions,
    )
    batch = inputs(channels, size)
    assert unet(**batch).shape == batch["x"].shape


def test_context_changes_output():
    unet = tiny_unet()
    batch = inputs()
    other_context = torch.randn_like(batch["context"])
    with torch.no_grad():
        assert not torch.allclose(unet(**batch), unet(**{**batch, "context": other_context}), atol=1e-4)


@pytest.mark.parametrize("use_scale_shift_norm", [False, True])
def test_class_embedding_and_timestep_change_output(use_scale_shift_norm):
    unet = tiny_unet(context_dim=None, class_embed_dim=6, use_scale_shift_norm=use_scale_shift_norm)
    batch = inputs(context_dim=None)
    y = torch.randn(BATCH, 6)
    with torch.no_grad():
        out = unet(**batch, y=y)
        assert not torch.allclose(out, unet(**batch, y=torch.randn(BATCH, 6)), atol=1e-4)
        assert not torch.allclose(out, unet(batch["x"], torch.tensor([500, 10]), y=y), atol=1e-4)


def test_channel_concatenation_conditioning():
    """The caller concatenates a conditioning image to z_t; only in_channels grows."""
    unet = tiny_unet(in_channels=4 + 3, context_dim=None)
    batch = inputs(context_dim=None)
    condition = torch.randn(BATCH, 3, 8, 8)
    with torch.no_grad():
        out = unet(torch.cat([batch["x"], condition], dim=1), batch["timesteps"])
        other = unet(torch.cat([batch["x"], -condition], dim=1), batch["timesteps"])
    assert out.shape == batch["x"].shape
    assert not torch.allclose(out, other, atol=1e-4)


def test_scalar_timestep_is_broadcast():
    unet = tiny_unet()
    batch = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            unet(batch["x"], torch.tensor(7), batch["context"]), unet(batch["x"], torch.tensor([7, 7]), batch["context"])
        )


def forward_backward(unet: UNetModel, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    unet.zero_grad()
    torch.manual_seed(3)  # same dropout masks in both runs
    out = unet(**batch)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in unet.parameters()]


def test_gradient_checkpointing_gives_same_output_and_gradients():
    unet = tiny_unet(dropout=0.1).train()
    batch = inputs()
    out_plain, grads_plain = forward_backward(unet, batch)
    unet.use_checkpoint = True
    out_ckpt, grads_ckpt = forward_backward(unet, batch)
    torch.testing.assert_close(out_ckpt, out_plain)
    for grad_ckpt, grad_plain in zip(grads_ckpt, grads_plain, strict=True):
        torch.testing.assert_close(grad_ckpt, grad_plain)


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_bf16_autocast_on_cpu(use_checkpoint):
    unet = tiny_unet(use_checkpoint=use_checkpoint)
    batch = inputs()
    with torch.no_grad():
        reference = unet(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(**batch)
        out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters())
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize(
    "build, call, message",
    [
        (dict(), dict(context=None), "needs a context"),
        (dict(), dict(context=torch.randn(BATCH, 5, 7)), r"context must be \(B, L, 8\)"),
        (dict(context_dim=None), dict(), "context_dim=None"),
        (dict(), dict(y=torch.randn(BATCH, 6)), "class_embed_dim=None"),
        (dict(class_embed_dim=6), dict(), "needs y"),
        (dict(class_embed_dim=6), dict(y=torch.randn(BATCH, 5)), r"y must be \(B, 6\)"),
        (dict(), dict(x=torch.randn(BATCH, 4, 7, 7)), "divisible by 2"),
    ],
    ids=["missing-context", "context-width", "unexpected-context", "unexpected-y", "missing-y", "y-width", "odd-size"],
)
def test_misuse_raises_clear_error(build, call, message):
    unet = tiny_unet(**build)
    with pytest.raises(ValueError, match=message):
        unet(**{**inputs(), **call})


@pytest.mark.parametrize(
    "heads, message",
    [(dict(num_heads=-1), "exactly one of"), (dict(num_head_channels=4), "exactly one of"),
     (dict(num_heads=3), "must be positive and divide")],
)
def test_bad_head_settings_raise(heads, message):
    with pytest.raises(ValueError, match=message):
        tiny_unet(**heads)


@pytest.mark.parametrize("context_dim", [None, 12])
def test_sdpa_attention_equals_naive_softmax(context_dim):
    torch.manual_seed(0)
    attention = Attention(query_dim=16, context_dim=context_dim, heads=4, dim_head=8).eval()
    x = torch.randn(2, 10, 16)
    context = None if context_dim is None else torch.randn(2, 6, context_dim)
    source = x if context is None else context

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], 4, 8).permute(0, 2, 1, 3)

    q, k, v = heads(attention.to_q(x)), heads(attention.to_k(source)), heads(attention.to_v(source))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attention.to_out((weights @ v).permute(0, 2, 1, 3).reshape(2, 10, 32))
    torch.testing.assert_close(attention(x, context), expected)


def test_autoencoder_attention_block_equals_naive_softmax():
    torch.manual_seed(0)
    block = perturb(AttnBlock(16, norm_groups=8)).eval()
    x = torch.randn(2, 16, 3, 5)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (B, C, N)
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(16), dim=-1)  # (B, N, N)
    expected = x + block.proj_out((v @ weights.transpose(1, 2)).view_as(x))
    torch.testing.assert_close(block(x), expected)


# ---------------------------------------------------------------- key-padding mask and 2-D positions
def test_key_padding_mask_equals_attention_over_the_true_tokens_only():
    torch.manual_seed(0)
    attention = Attention(16, context_dim=8, heads=2, dim_head=8)
    x, context = torch.randn(2, 6, 16), torch.randn(2, 5, 8)
    lengths = [3, 5]
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    masked = attention(x, context, mask)
    for row, length in enumerate(lengths):
        expected = attention(x[row:row + 1], context[row:row + 1, :length])
        torch.testing.assert_close(masked[row:row + 1], expected, atol=1e-6, rtol=0)


def test_unet_context_mask_hides_the_masked_tokens_and_checks_its_shape():
    unet = tiny_unet()
    batch = inputs()
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    changed = batch["context"].clone()
    changed[0, 2:] = torch.randn(3, 8)
    with torch.no_grad():
        out = unet(batch["x"], batch["timesteps"], batch["context"], context_mask=mask)
        torch.testing.assert_close(unet(batch["x"], batch["timesteps"], changed, context_mask=mask), out)
        assert (unet(batch["x"], batch["timesteps"], changed) - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="context_mask must be a bool tensor of shape"):
        unet(batch["x"], batch["timesteps"], batch["context"], context_mask=mask[:, :3])
    with pytest.raises(ValueError, match="context_mask without a context"):
        tiny_unet(context_dim=None)(batch["x"], batch["timesteps"], context_mask=mask)


def test_spatial_positional_embedding_keeps_the_key_layout_and_changes_the_output():
    plain, positional = tiny_unet(), tiny_unet(spatial_positional_embedding=True)
    assert list(plain.state_dict()) == list(positional.state_dict())  # no weights: SD checkpoints load either way
    positional.load_state_dict(plain.state_dict())
    batch = inputs()
    with torch.no_grad():
        assert (plain(**batch) - positional(**batch)).abs().max() > 1e-4


def test_spatial_positional_embedding_is_the_fourier_formula_in_image_coordinates():
    embedding = spatial_positional_embedding(4, 6, 40)  # 10 bands possible, POSITION_BANDS used
    assert embedding.shape == (24, 40)
    i, j = 2, 5  # token row-major index 2 * 6 + 5
    y, x = (i + 0.5) / 4, (j + 0.5) / 6
    bands = torch.tensor([math.pi * 2.0**k for k in range(POSITION_BANDS)])
    expected = torch.stack([torch.sin(bands * y), torch.cos(bands * y), torch.sin(bands * x), torch.cos(bands * x)],
                           dim=-1).flatten()
    torch.testing.assert_close(embedding[2 * 6 + 5, : 4 * POSITION_BANDS], expected)
    assert torch.all(embedding[:, 4 * POSITION_BANDS:] == 0)
    # image coordinates: the token whose centre is the image centre has the same code at any resolution
    torch.testing.assert_close(spatial_positional_embedding(3, 3, 16)[4], spatial_positional_embedding(9, 9, 16)[40])
