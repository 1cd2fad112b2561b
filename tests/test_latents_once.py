"""Latents once (ldm/training/latents_once.py): stage 2 trains from latents encoded once by default, reuses them on
the next run, re-encodes for another first stage or other data, keeps concat tasks on images, and opts out."""
import os

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.data.latent_cache import META_FILE, decode_latent_sample
from ldm.data.shards import expand_urls, iter_raw_samples
from ldm.data.transforms import ImageTransform, decode_sample, uint8_to_signed
from ldm.data.webdataset import ShapesDataModule, WebDataModule
from ldm.inference.latent_cache import encode_latents_with
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.nets.vae import AutoencoderNet
from ldm.training.latents_once import cache_identity, why_images
from ldm.training.pipeline import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 32
VAE = dict(embed_dim=3, z_channels=4, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[],
           norm_groups=8)


def save_autoencoder(path: str, seed: int = 0) -> AutoencoderNet:
    torch.manual_seed(seed)
    vae = AutoencoderNet(**VAE).eval()
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()},
                "hyper_parameters": {"vae": VAE}}, path)
    return vae


def overrides(tmp, run: str, ae: str, *extra: str) -> list[str]:
    return ["experiment=ldm_f4_text", "size=tiny", f"paths.data_dir={tmp}/data", f"data.resolution={RES}",
            "data.num_train=16", "data.num_val=8", "data.samples_per_shard=8", "data.batch_size=4",
            "data.num_workers=0", f"model.first_stage_ckpt={ae}", "model.unet.channel_mult=[1,2]",
            "model.unet.attention_resolutions=[2]", "callbacks=default", "logger=csv", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", f"paths.output_dir={tmp}/{run}",
            f"paths.cache_dir={tmp}/cache", *extra]


@pytest.fixture()
def seen(monkeypatch) -> list[set]:
    """The keys of every batch `batch_latents` saw (training and validation)."""
    keys: list[set] = []
    original = LatentDiffusion.batch_latents

    def recording(self, batch, generator=None):
        keys.append(set(batch))
        return original(self, batch, generator)

    monkeypatch.setattr(LatentDiffusion, "batch_latents", recording)
    return keys


def caches(tmp) -> list[str]:
    root = tmp / "cache" / "latents"
    return sorted(os.listdir(root)) if root.exists() else []


def test_stage_two_trains_from_cached_latents_reuses_them_and_rebuilds_for_another_first_stage(tmp_path, seen):
    ae, other = str(tmp_path / "ae.ckpt"), str(tmp_path / "other.ckpt")
    save_autoencoder(ae), save_autoencoder(other, seed=3)
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        first = train(compose("train", overrides=overrides(tmp_path, "a", ae)))
        [entry] = caches(tmp_path)
        meta_path = tmp_path / "cache" / "latents" / entry / META_FILE
        stamp = os.path.getmtime(meta_path)
        datamodule = first.trainer.datamodule
        assert type(datamodule) is ShapesDataModule  # the image module, its train split on the cache
        assert datamodule.train_urls.startswith(str(tmp_path / "cache" / "latents" / entry))
        assert "image" in next(iter(datamodule.val_dataloader()))  # validation / evaluation stay on images
        assert first.trainer.global_step == 2
        # training batches (and the scale-factor batch) are latents; only validation encodes images
        assert {"latent_mean", "latent_std"} <= seen[0] and "image" not in seen[0]
        assert any("image" in keys for keys in seen)

        train(compose("train", overrides=overrides(tmp_path, "b", ae)))  # reused, not re-encoded
        assert caches(tmp_path) == [entry] and os.path.getmtime(meta_path) == stamp

        train(compose("train", overrides=overrides(tmp_path, "c", other)))  # another first stage: its own cache
        assert len(caches(tmp_path)) == 2

        seen.clear()
        train(compose("train", overrides=overrides(tmp_path, "d", ae, "cache_latents=false")))
        assert len(caches(tmp_path)) == 2 and all("image" in keys for keys in seen)


def test_the_cache_identity_follows_the_data_and_concat_tasks_stay_on_images(tmp_path):
    model = LatentDiffusion(unet=dict(model_channels=16, channel_mult=[1], attention_resolutions=[], num_res_blocks=1,
                                      num_heads=2, norm_groups=8),
                            conditioner={"_target_": "ldm.models.conditioners.NullConditioner"}, first_stage=VAE,
                            first_stage_factor=4, image_size=RES)
    shapes = ShapesDataModule(str(tmp_path / "s"), resolution=RES, num_train=8, num_val=8, samples_per_shard=8)
    assert why_images(model, shapes) is None
    more = ShapesDataModule(str(tmp_path / "s"), resolution=RES, num_train=16, num_val=8, samples_per_shard=8)
    assert cache_identity(model, shapes) != cache_identity(model, more)
    shapes.prepare_data()
    files = WebDataModule(shapes.train_urls, resolution=RES)
    before = cache_identity(model, files)
    os.utime(expand_urls(shapes.train_urls)[0], ns=(1, 1))  # the shard was rewritten
    assert cache_identity(model, files) != before
    sr = ShapesDataModule(str(tmp_path / "s"), resolution=RES, num_train=8, num_val=8, samples_per_shard=8,
                          degradations={"lowres": {"factor": 4}})
    assert "concat conditions" in why_images(model, sr)
    assert "remote" in why_images(model, WebDataModule("http://example.invalid/{0..1}.tar", resolution=RES))


def test_flipped_copies_hold_the_mirror_images_posterior(tmp_path):
    vae = save_autoencoder(str(tmp_path / "ae.ckpt"))
    data = ShapesDataModule(str(tmp_path / "s"), resolution=RES, num_train=8, num_val=8, samples_per_shard=8)
    meta = encode_latents_with(vae, data, str(tmp_path / "c"), batch_size=8, splits=("train",), flip=True)
    assert meta["flipped_copies"] is True
    raw = list(iter_raw_samples(expand_urls(str(tmp_path / "c" / meta["splits"]["train"])), on_error=print))
    source = list(iter_raw_samples(expand_urls(data.train_urls), on_error=print))
    transform = ImageTransform(RES, random_crop=False, random_flip=False)
    images = uint8_to_signed(torch.stack([decode_sample(r, transform, 0, 0)["image"] for r in source]))
    with torch.no_grad():
        mirrored = vae.encode(images.flip(-1))
    rows = [decode_latent_sample(r, epoch=0, flip=True) for r in raw]
    unflipped = [decode_latent_sample(r, epoch=0, flip=False) for r in raw]
    picked = [not torch.equal(a["latent_mean"], b["latent_mean"]) for a, b in zip(rows, unflipped)]
    assert 0 < sum(picked) < len(rows)  # about half of the samples read their mirror image
    for index, flipped in enumerate(picked):
        if flipped:
            torch.testing.assert_close(rows[index]["latent_mean"], mirrored.mean[index], atol=1e-5, rtol=1e-5)
    again = [decode_latent_sample(r, epoch=0, flip=True)["latent_mean"] for r in raw]
    assert all(np.array_equal(a, b["latent_mean"]) for a, b in zip(again, rows))  # seeded by (seed, epoch, key)
