"""Cached latents: the cache holds the encoder's posterior, the reader splits and resumes like the image
loader, stage 2 trains from it, and a cache made by another autoencoder is refused."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

import ldm.data.webdataset as webdataset_module
from ldm.data.latent_cache import LatentDataModule, weights_sha256
from ldm.data.shards import expand_urls, iter_raw_samples
from ldm.data.transforms import ImageTransform, decode_sample, uint8_to_signed
from ldm.data.webdataset import ShapesDataModule
from ldm.inference.latent_cache import META_FILE, encode_latents
from ldm.nets.vae import AutoencoderNet
from ldm.training.pipeline import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 32
NUM_TRAIN, NUM_VAL, PER_SHARD = 24, 8, 6


def vae_config(factor: int) -> dict:
    ch_mult = {4: [1, 2, 2], 8: [1, 2, 2, 2]}[factor]
    return dict(embed_dim=3 if factor == 4 else 4, z_channels=4, ch=16, ch_mult=ch_mult, num_res_blocks=1,
                attention_resolutions=[], norm_groups=8)


def save_autoencoder(path: str, factor: int = 4, seed: int = 0) -> AutoencoderNet:
    """A stage-1 checkpoint as AutoencoderKL writes it (weights `vae.*`, constructor args in hparams)."""
    torch.manual_seed(seed)
    vae = AutoencoderNet(**vae_config(factor)).eval()
    state = {f"vae.{k}": v for k, v in vae.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"vae": vae_config(factor)}}, path)
    return vae


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Shapes shards (4 train shards of 6, 2 val), an f=4 autoencoder and its latent cache."""
    tmp = tmp_path_factory.mktemp("latents")
    data = ShapesDataModule(str(tmp / "shapes"), resolution=RES, num_train=NUM_TRAIN, num_val=NUM_VAL,
                            samples_per_shard=PER_SHARD, batch_size=4, num_workers=0)
    vae = save_autoencoder(str(tmp / "ae_f4.ckpt"))
    meta = encode_latents(str(tmp / "ae_f4.ckpt"), data, str(tmp / "cache"), batch_size=5)
    return {"tmp": tmp, "data": data, "vae": vae, "meta": meta, "root": str(tmp / "cache"),
            "ae": str(tmp / "ae_f4.ckpt")}


def test_cache_holds_the_posterior_and_decodes_like_the_encoder(cache):
    meta, vae = cache["meta"], cache["vae"]
    assert meta["num_samples"] == {"train": NUM_TRAIN, "val": NUM_VAL}
    assert meta["first_stage"]["factor"] == 4 and meta["first_stage"]["latent_channels"] == 3
    assert meta["first_stage"]["weights_sha256"] == weights_sha256(vae)
    assert len(expand_urls(os.path.join(cache["root"], meta["splits"]["train"]))) == NUM_TRAIN // PER_SHARD

    loader = LatentDataModule(cache["root"], resolution=RES, batch_size=4, num_workers=0,
                              shuffle_buffer=0).val_dataloader()
    batch = next(iter(loader))
    assert set(batch) == {"latent_mean", "latent_std", "caption", "class_label", "key", "num_skipped"}
    assert batch["latent_mean"].shape == batch["latent_std"].shape == (4, 3, RES // 4, RES // 4)
    assert batch["class_label"].dtype == torch.int64 and all(batch["caption"])

    transform = ImageTransform(RES, random_crop=False, random_flip=False)
    raw = list(iter_raw_samples(expand_urls(cache["data"].val_urls), on_error=print))[:4]
    images = uint8_to_signed(torch.stack([decode_sample(r, transform, 0, 0)["image"] for r in raw]))
    assert [r["__key__"] for r in raw] == batch["key"]
    with torch.no_grad():
        posterior = vae.encode(images)
        torch.testing.assert_close(batch["latent_mean"], posterior.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch["latent_std"], posterior.std, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vae.decode(batch["latent_mean"]), vae.decode(posterior.mode()), atol=1e-5, rtol=1e-5)


def test_two_ranks_split_the_cache_and_resume_mid_epoch(cache, monkeypatch):
    keys = []
    for rank in (0, 1):
        monkeypatch.setattr(webdataset_module, "distributed_rank_and_world_size", lambda r=rank: (r, 2))
        loader = LatentDataModule(cache["root"], resolution=RES, batch_size=2, num_workers=2).train_dataloader()
        batches = [b["key"] for b in loader]
        assert len(batches) == len(loader) == 6
        keys.append([k for b in batches for k in b])
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0]) | set(keys[1])) == NUM_TRAIN

    monkeypatch.setattr(webdataset_module, "distributed_rank_and_world_size", lambda: (0, 1))
    straight = LatentDataModule(cache["root"], resolution=RES, batch_size=3, num_workers=2)
    iterator = iter(straight.train_dataloader())
    [next(iterator) for _ in range(3)]
    state = straight.state_dict()
    remaining = list(iterator)
    resumed = LatentDataModule(cache["root"], resolution=RES, batch_size=3, num_workers=2)
    resumed.load_state_dict(state)
    replay = list(resumed.train_dataloader())
    assert [b["key"] for b in replay] == [b["key"] for b in remaining] and len(replay) == NUM_TRAIN // 3 - 3
    torch.testing.assert_close(replay[0]["latent_mean"], remaining[0]["latent_mean"])


@pytest.mark.parametrize("factor, seed", [(4, 1), (8, 0)])
def test_a_cache_of_another_autoencoder_is_refused_naming_both(cache, factor, seed):
    other = save_autoencoder(str(cache["tmp"] / f"other_{factor}_{seed}.ckpt"), factor=factor, seed=seed)
    data = LatentDataModule(cache["root"], resolution=RES, num_workers=0)
    expected = r"was made by the autoencoder .*ae_f4\.ckpt \(f=4.*first stage is .*other"
    with pytest.raises(ValueError, match=expected) as error:
        data.check_first_stage(other, str(cache["tmp"] / f"other_{factor}_{seed}.ckpt"))
    assert f"f={factor}" in str(error.value)
    data.check_first_stage(cache["vae"], cache["ae"])  # its own autoencoder passes


def test_wrong_resolution_and_missing_meta_are_explained(cache, tmp_path):
    with pytest.raises(ValueError, match=f"data.resolution={RES}"):
        LatentDataModule(cache["root"], resolution=RES * 2)
    with pytest.raises(FileNotFoundError, match=META_FILE):
        LatentDataModule(str(tmp_path), resolution=RES)


def stage_two_overrides(cache, tmp_path, first_stage_ckpt: str) -> list[str]:
    return ["experiment=ldm_f4_text", "size=tiny", "data=latents", f"data.root={cache['root']}",
            f"data.resolution={RES}", "data.batch_size=4", "data.num_workers=0",
            f"model.first_stage_ckpt={first_stage_ckpt}",
            "model.unet.channel_mult=[1,2]", "model.unet.attention_resolutions=[2]", "callbacks=default",
            "logger=csv", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
            f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache"]


def test_stage_two_trains_from_latents_and_refuses_another_first_stage(cache, tmp_path):
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        cfg = compose("train", overrides=stage_two_overrides(cache, tmp_path, cache["ae"]))
        result = train(cfg)
        assert result.trainer.global_step == 3 and "val/loss" in result.trainer.callback_metrics
        other = str(tmp_path / "other.ckpt")
        save_autoencoder(other, seed=5)
        with pytest.raises(ValueError, match="was made by the autoencoder"):
            train(compose("train", overrides=stage_two_overrides(cache, tmp_path / "b", other)))


def test_command_line_writes_a_cache(cache, tmp_path):
    args = [sys.executable, "-m", "ldm.cli.encode_latents", f"first_stage_ckpt={cache['ae']}", f"out={tmp_path}/cli",
            f"data.root={cache['tmp']}/shapes", f"data.resolution={RES}", f"data.num_train={NUM_TRAIN}",
            f"data.num_val={NUM_VAL}", f"data.samples_per_shard={PER_SHARD}", "splits=[val]", "device=cpu"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "cli" / META_FILE) as handle:
        meta = json.load(handle)
    assert meta["num_samples"] == {"val": NUM_VAL}
    assert meta["first_stage"]["weights_sha256"] == cache["meta"]["first_stage"]["weights_sha256"]
