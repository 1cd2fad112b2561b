"""Loader-side conditions: super-resolution degradations and inpainting masks deterministic by (seed, epoch,
key), the shapes semantic map beside byte-identical images, and the map following the image's crop and flip."""
import hashlib
import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.degradations import (
    RandomMask,
    SuperResolutionDegradation,
    build_degradations,
    degrade,
)
from ldm.data.shapes import COLORS, SHAPES, render_sample_with_map, write_shapes
from ldm.data.shards import write_shard
from ldm.data.webdataset import ShapesDataModule, WebDataModule

# sha256 over (member name, bytes) of the shards main @ 05dda90 wrote for these parameters, before the map existed
OLD_SHARDS = dict(resolution=32, num_train=20, num_val=5, num_objects=2, seed=3, samples_per_shard=8)
OLD_SHARDS_SHA256 = "cfa79610f3239ea5304b30074c7f7d8b93645ad797c05ddec8ed826cfa0a5582"


def crop(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, size, size), dtype=np.uint8))


def test_same_seed_epoch_key_gives_the_same_degradations_and_others_differ():
    degradations = build_degradations({"lowres": {"factor": 4, "blur_sigma": [0, 1.5], "noise_std": [0, 0.05],
                                                  "jpeg_quality": [30, 95]}, "mask": {}}, resolution=32)
    pixels = crop()
    first = degrade(pixels, degradations, seed=1, epoch=0, key="a")
    again = degrade(pixels, degradations, seed=1, epoch=0, key="a")
    assert first["lowres"].shape == (3, 8, 8) and first["lowres"].dtype == torch.uint8
    assert first["mask"].shape == (1, 32, 32) and set(first["mask"].unique().tolist()) <= {0, 1}
    assert all(torch.equal(first[k], again[k]) for k in first)
    for other in ({"seed": 2, "epoch": 0, "key": "a"}, {"seed": 1, "epoch": 1, "key": "a"}, {"seed": 1, "epoch": 0, "key": "b"}):
        changed = degrade(pixels, degradations, **other)
        assert not torch.equal(changed["mask"], first["mask"]) or not torch.equal(changed["lowres"], first["lowres"])


def test_plain_super_resolution_degradation_is_pil_bicubic():
    pixels = crop(3)
    lowres = SuperResolutionDegradation(factor=4)(pixels, random.Random(0))
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize((8, 8), Image.Resampling.BICUBIC, reducing_gap=None)
    assert torch.equal(lowres, torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    noisy = SuperResolutionDegradation(factor=4, noise_std=0.1)(pixels, random.Random(0))
    assert 10 < (noisy.float() - lowres.float()).std() < 40  # 0.1 x 255 = 25.5 levels, clipped at 0 / 255


@pytest.mark.parametrize("kind", ["box", "stroke", "outpaint"])
def test_each_mask_kind_is_binary_and_shaped_as_it_says(kind):
    masks = [RandomMask(weights={kind: 1.0})(64, random.Random(i))[0] for i in range(20)]
    for mask in masks:
        assert mask.dtype == torch.uint8 and 0 < mask.sum() < 64 * 64
    areas = torch.stack([m.float().mean() for m in masks])
    if kind == "box":  # one rectangle of 10-40 % of the image (rounding aside)
        assert ((areas > 0.08) & (areas < 0.42)).all()
        for mask in masks:
            rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
            assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    if kind == "outpaint":  # the border is masked, on at least one side, the centre is known
        for mask in masks:
            edges = [mask[0].all(), mask[-1].all(), mask[:, 0].all(), mask[:, -1].all()]
            assert any(edges) and mask[32, 32] == 0


def test_bad_degradation_configs_are_clear_errors():
    with pytest.raises(ValueError, match="not divisible by the super-resolution factor 4"):
        build_degradations({"lowres": {"factor": 4}}, resolution=30)
    with pytest.raises(ValueError, match="unknown fields \\['blur'\\]"):
        build_degradations({"blur": {}}, resolution=32)
    with pytest.raises(ValueError, match="mask weights"):
        RandomMask(weights={"circle": 1.0})


def test_loader_conditions_are_the_same_in_two_passes_and_new_each_epoch(tmp_path):
    root = str(tmp_path / "shapes")
    module = ShapesDataModule(root, resolution=32, num_train=8, num_val=4, samples_per_shard=8, batch_size=4,
                              num_workers=0, shuffle_buffer=0, semantic_map=True,
                              degradations={"lowres": {"factor": 4}, "mask": {}})
    module.prepare_data()

    def first_batch(epoch: int) -> dict:
        module.set_epoch(epoch)
        return next(iter(module.train_dataloader()))

    a, b, c = first_batch(0), first_batch(0), first_batch(1)
    assert a["key"] == b["key"] == c["key"]
    assert a["lowres"].shape == (4, 3, 8, 8) and a["lowres"].min() >= -1 and a["mask"].dtype == torch.float32
    assert a["semantic_map"].dtype == torch.int64 and a["semantic_map"].shape == (4, 1, 32, 32)
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["lowres"], b["lowres"])
    assert not torch.equal(a["mask"], c["mask"])  # a new epoch draws new masks
    assert torch.equal(a["lowres"], c["lowres"])  # plain bicubic has nothing random
    val = [next(iter(module.val_dataloader()))["mask"] for _ in range(2)]
    assert torch.equal(*val)  # the val split: the same masks in every evaluation


# ---------------------------------------------------------------- the shapes semantic map
def test_shapes_images_are_byte_identical_to_before_the_map(tmp_path):
    write_shapes(str(tmp_path), **OLD_SHARDS)
    digest, maps = hashlib.sha256(), 0
    for name in ("train-000000.tar", "val-000000.tar"):
        with tarfile.open(tmp_path / name) as tar:
            for member in tar:
                if member.name.endswith(".seg.png"):
                    maps += 1
                    continue
                digest.update(member.name.encode())
                digest.update(tar.extractfile(member).read())
    assert digest.hexdigest() == OLD_SHARDS_SHA256 and maps == 8 + 5


def test_semantic_map_marks_each_object_with_its_class():
    rng = np.random.default_rng(0)
    for _ in range(10):
        image, attributes, semantic = render_sample_with_map(rng, resolution=64, num_objects=2)
        pixels, labels = np.asarray(image).astype(int), np.asarray(semantic)
        assert semantic.mode == "L" and labels.shape == (64, 64)
        expected = {list(COLORS).index(o["color"]) * len(SHAPES) + SHAPES.index(o["shape"]) + 1
                    for o in attributes["objects"]}
        assert set(np.unique(labels)) == {0} | expected
        for value in expected:
            colour = COLORS[list(COLORS)[(value - 1) // len(SHAPES)]]
            exact = (pixels == colour).all(-1)  # pixels the object covers entirely
            assert exact.sum() > 10 and (labels[exact] == value).all()
            assert (labels == value).sum() <= 1.6 * exact.sum() + 20  # plus the edge pixels it covers half of
        assert (pixels[labels == 0].std(-1) < 1e-9).mean() > 0.9  # background pixels are grey


def test_semantic_map_follows_the_image_crop_and_flip(tmp_path):
    """Any shards: a rectangular image and its map, randomly cropped and flipped by the same draw."""
    gradient = np.tile(np.arange(48, dtype=np.uint8) * 5, (32, 1))
    image, labels = np.stack([gradient] * 3, -1), (np.arange(48)[None].repeat(32, 0) // 6).astype(np.uint8)
    samples = []
    for index in range(6):
        png, seg = io.BytesIO(), io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        Image.fromarray(labels, mode="L").save(seg, format="PNG")
        samples.append((f"{index:04d}", {"png": png.getvalue(), "txt": b"x", "seg.png": seg.getvalue()}))
    write_shard(str(tmp_path / "train-000000.tar"), samples)
    with open(tmp_path / "sizes.json", "w") as handle:
        json.dump({"train-000000.tar": 6}, handle)
    module = WebDataModule(str(tmp_path / "train-000000.tar"), resolution=16, batch_size=6, num_workers=0,
                           random_flip=True, semantic_map=True)
    batch = next(iter(module.train_dataloader()))
    # the image was resized 32 -> 16 (48 -> 24 wide) and cropped; its columns still give the label of the map
    column_values = ((batch["image"][:, 0, 8] + 1) * 127.5)  # (B, 16): one row of the grey gradient
    source_column = column_values / 5  # the 48-px column it came from
    assert (torch.abs(batch["semantic_map"][:, 0, 8] - source_column // 6) <= 1).float().mean() > 0.9


def test_full_masks_hide_everything_and_are_off_by_default():
    assert RandomMask(weights={"full": 1.0})(16, random.Random(0)).all()
    default = RandomMask()
    assert "full" not in default.kinds and all(not default(16, random.Random(i)).all() for i in range(50))
    quarter = RandomMask(weights={"box": 1.0, "stroke": 1.0, "outpaint": 1.0, "full": 1.0})
    share = sum(bool(quarter(16, random.Random(i)).all()) for i in range(400)) / 400
    assert 0.18 < share < 0.32  # SD-inpainting's 25 % of wholly masked samples
