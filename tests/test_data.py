"""Data layer: shapes spec and determinism, shard round trip, corrupt data, rank/worker splits, resume."""
import importlib.util
import io
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm.data.webdataset as webdataset_module
from ldm.data.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    class_index,
    render_sample,
    write_shapes,
)
from ldm.data.shards import expand_urls, update_sizes, write_shard
from ldm.data.webdataset import ShapesDataModule, WebDataModule

RES = 16
REPO = Path(__file__).resolve().parents[1]
CAPTION = re.compile(r"^a (\w+) (circle|square|triangle) at the ([a-z ]+)$")


def epoch_keys(loader) -> list[list[str]]:
    return [batch["key"] for batch in loader]


def flat(batches: list[list[str]]) -> list[str]:
    return [key for keys in batches for key in keys]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> str:
    """30 train samples in 6 shards of 5 (4 + 2 for a 2-rank x 2-worker split), 8 val samples."""
    root = str(tmp_path_factory.mktemp("shapes"))
    write_shapes(root, resolution=RES, num_train=30, num_val=8, seed=3, samples_per_shard=5)
    return root


def shapes_module(root: str, **kw) -> ShapesDataModule:
    args = dict(resolution=RES, num_train=30, num_val=8, seed=3, samples_per_shard=5, batch_size=4, num_workers=2)
    return ShapesDataModule(root, **{**args, **kw})


def simulate_rank(monkeypatch, rank: int, world_size: int) -> None:
    monkeypatch.setattr(webdataset_module, "distributed_rank_and_world_size", lambda: (rank, world_size))


# --- shapes ---------------------------------------------------------------------------------------------

def test_shapes_are_byte_identical_for_a_seed_and_differ_across_seeds(tmp_path):
    def shard_bytes(root, seed):
        write_shapes(str(root), resolution=RES, num_train=6, num_val=2, seed=seed, samples_per_shard=4)
        return {n: open(os.path.join(root, n), "rb").read() for n in sorted(os.listdir(root)) if n.endswith(".tar")}

    first, again, other = (shard_bytes(tmp_path / d, s) for d, s in (("a", 0), ("b", 0), ("c", 1)))
    assert list(first) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert first == again
    assert first["train-000000.tar"] != other["train-000000.tar"]


def test_write_shapes_is_idempotent_and_rewrites_on_new_parameters(tmp_path):
    urls = write_shapes(str(tmp_path), resolution=RES, num_train=4, num_val=0, samples_per_shard=4)
    shard = tmp_path / "train-000000.tar"
    os.utime(shard, (0, 0))
    assert write_shapes(str(tmp_path), resolution=RES, num_train=4, num_val=0, samples_per_shard=4) == urls
    assert os.path.getmtime(shard) == 0 and urls["val"] is None
    write_shapes(str(tmp_path), resolution=RES, num_train=4, num_val=0, samples_per_shard=4, seed=1)
    assert os.path.getmtime(shard) > 0


@pytest.mark.parametrize("num_objects", [1, 2])
def test_rendered_objects_follow_the_spec(num_objects):
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, attributes = render_sample(rng, resolution=64, num_objects=num_objects)
        pixels = np.asarray(image).astype(int)
        assert image.size == (64, 64) and image.mode == "RGB"
        objects = attributes["objects"]
        assert len(objects) == num_objects and len({o["position"] for o in objects}) == num_objects
        parts = attributes["caption"].split(" and ")
        for obj, part in zip(objects, parts, strict=True):
            assert CAPTION.match(part).groups() == (obj["color"], obj["shape"], obj["position"])
            row, col = divmod(POSITIONS.index(obj["position"]), 3)
            cell = pixels[row * 64 // 3:(row + 1) * 64 // 3, col * 64 // 3:(col + 1) * 64 // 3]
            inside = (np.abs(cell - COLORS[obj["color"]]).max(-1) == 0).sum()  # exact colour inside the object
            assert 0.3 * (0.15 * 64) ** 2 < inside <= (0.25 * 64) ** 2  # about 15-25% of the side
        background = pixels[0, 0] if objects[0]["position"] != "top left" else pixels[-1, -1]
        assert background[0] == background[1] == background[2] <= 48
        assert attributes["class_label"] == class_index(objects[0]["color"], objects[0]["shape"])
    assert class_index("red", "circle") == 0 and class_index("white", "triangle") == 20
    assert len(SHAPES) * len(COLORS) == 21


# --- loading --------------------------------------------------------------------------------------------

def test_shard_round_trip_gives_the_written_pixels_captions_and_classes(shapes_root):
    dm = shapes_module(shapes_root, num_workers=0)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 3, RES, RES)
    assert batch["class_label"].dtype == torch.int64
    raw = _read_tar(os.path.join(shapes_root, "val-000000.tar"))
    for i, key in enumerate(batch["key"]):
        png = np.array(Image.open(io.BytesIO(raw[f"{key}.png"])))
        torch.testing.assert_close(batch["image"][i], torch.from_numpy(png).permute(2, 0, 1).float() / 127.5 - 1)
        attributes = json.loads(raw[f"{key}.json"])
        assert batch["caption"][i] == attributes["caption"] == raw[f"{key}.txt"].decode()
        assert batch["class_label"][i].item() == attributes["class_label"] == int(raw[f"{key}.cls"])


def test_brace_urls_select_exactly_their_shards(shapes_root):
    pattern = f"{shapes_root}/train-{{000001..000002}}.tar"
    assert expand_urls(pattern) == [f"{shapes_root}/train-00000{i}.tar" for i in (1, 2)]
    dm = WebDataModule(pattern, resolution=RES, batch_size=4, num_workers=0)
    assert sorted(flat(epoch_keys(dm.train_dataloader()))) == [f"{i:08d}" for i in range(5, 15)]
    with pytest.raises(FileNotFoundError, match="do not exist"):
        WebDataModule(f"{shapes_root}/nothing-{{0..1}}.tar", num_workers=0).train_dataloader()


def test_img2dataset_shards_load_with_resize_crop_and_no_class(tmp_path):
    def jpg(width, height):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (200, 100, 50)).save(buffer, format="JPEG")
        return buffer.getvalue()

    samples = [(f"{i:09d}", {"jpg": jpg(40, 24), "txt": f"photo {i}".encode(), "json": b"{}"}) for i in range(6)]
    write_shard(str(tmp_path / "00000.tar"), samples)
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 6}))  # img2dataset's count
    dm = WebDataModule(str(tmp_path / "00000.tar"), str(tmp_path / "00000.tar"), resolution=RES, batch_size=6,
                       num_workers=0, random_flip=True)
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        assert batch["image"].shape == (6, 3, RES, RES)
        assert batch["class_label"].tolist() == [-1] * 6
        assert sorted(batch["caption"]) == [f"photo {i}" for i in range(6)]
        red = (batch["image"][:, 0] + 1) * 127.5
        assert (red - 200).abs().max() < 12  # JPEG colour survives decode + antialiased resize


def test_corrupt_samples_and_truncated_tar_are_skipped_counted_and_warned(tmp_path):
    good = _shapes_samples(6)
    broken = [("bad00000", {"png": b"not a png", "txt": b"x"}), ("nolabel0", {"png": good[0][1]["png"]})]
    write_shard(str(tmp_path / "a.tar"), good[:3] + broken)
    write_shard(str(tmp_path / "b.tar"), good[3:])
    data = open(tmp_path / "b.tar", "rb").read()
    second_png_member = data.index(b"00000004.png")  # cut inside the second sample: two are lost
    (tmp_path / "b.tar").write_bytes(data[:second_png_member + 512 + 100])
    update_sizes(str(tmp_path), {"a.tar": 5, "b.tar": 3})
    dm = WebDataModule(str(tmp_path / "{a,b}.tar"), resolution=RES, batch_size=4, num_workers=0)
    with pytest.warns(RuntimeWarning) as caught:
        batches = list(dm.train_dataloader())
    messages = " ".join(str(w.message) for w in caught)
    assert "not a png" not in messages and "cannot be decoded" in messages and "neither a caption" in messages
    assert "fewer readable samples" in messages  # b.tar came up short: re-read to keep the planned length
    keys = flat([b["key"] for b in batches])
    assert len(batches) == 2 and set(keys) == {"00000000", "00000001", "00000002", "00000003"}
    assert dm.num_skipped == sum(b["num_skipped"] for b in batches) >= 3  # bad png, no label, truncated member
    assert all(b["image"].shape[0] == len(b["key"]) for b in batches)


# --- splitting over workers and ranks ---------------------------------------------------------------------

def test_each_sample_once_per_epoch_over_two_workers_in_a_new_order_each_epoch(shapes_root):
    dm = shapes_module(shapes_root)
    loader = dm.train_dataloader()
    first, second = flat(epoch_keys(loader)), flat(epoch_keys(loader))
    assert sorted(first) == sorted(second) == [f"{i:08d}" for i in range(30)]
    assert first != second and len(loader) == 8


def test_two_ranks_two_workers_partition_the_epoch(shapes_root, monkeypatch):
    per_rank = []
    for rank in (0, 1):
        simulate_rank(monkeypatch, rank, 2)
        loader = shapes_module(shapes_root, num_workers=2).train_dataloader()
        batches = epoch_keys(loader)
        assert len(batches) == len(loader)
        per_rank.append(flat(batches))
    assert len(epoch_keys(loader)) == len(batches)  # same count again next epoch
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"{i:08d}" for i in range(30)]


@pytest.mark.parametrize("train_shards, world_size", [("{000000..000002}", 2), ("000000", 2), ("{000000..000004}", 2)])
def test_uneven_shards_give_equal_batches_per_rank_and_a_warning(shapes_root, monkeypatch, train_shards, world_size):
    urls = f"{shapes_root}/train-{train_shards}.tar"
    counts = []
    for rank in range(world_size):
        simulate_rank(monkeypatch, rank, world_size)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader = WebDataModule(urls, resolution=RES, batch_size=2, num_workers=2).train_dataloader()
        explained = [w for w in caught if re.search(r"over 2 ranks.*multiple of \d+ shards", str(w.message))]
        assert len(explained) == (rank == 0)  # said once, by rank 0
        counts.append((len(loader), len(epoch_keys(loader))))
    assert len(set(counts)) == 1 and counts[0][0] == counts[0][1] > 0


def test_more_workers_than_shards_reduces_workers_with_a_warning(shapes_root):
    with pytest.warns(UserWarning, match="using 2 worker"):
        loader = WebDataModule(f"{shapes_root}/train-00000{{0,1}}.tar", resolution=RES, batch_size=4,
                               num_workers=4).train_dataloader()
    assert loader.num_workers == 2 and sorted(flat(epoch_keys(loader))) == [f"{i:08d}" for i in range(10)]


# --- resuming ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("consumed", [5, 11])
def test_resume_mid_epoch_from_state_yields_exactly_the_remaining_batches(tmp_path, consumed):
    # 7 shards over 2 workers: 20 and 15 samples, 7 and 5 batches, so one worker runs out first
    straight = shapes_module(str(tmp_path), num_train=35, num_workers=2, batch_size=3)
    straight.prepare_data()
    loader = straight.train_dataloader()
    list(loader)  # epoch 0
    iterator = iter(loader)
    first = [next(iterator) for _ in range(consumed)]
    state = straight.state_dict()
    taken = [(consumed + 1) // 2, consumed // 2] if consumed <= 10 else [consumed - 5, 5]  # round-robin
    assert state == {"epoch": 1, "batches_consumed": consumed, "samples_read": [[3 * n for n in taken]]}  # [rank]
    remaining = list(iterator)

    resumed = shapes_module(str(tmp_path), num_train=35, num_workers=2, batch_size=3)
    resumed.load_state_dict(state)
    replay = list(resumed.train_dataloader())
    assert [b["key"] for b in replay] == [b["key"] for b in remaining] and len(first) + len(replay) == 12
    for a, b in zip(replay, remaining):
        torch.testing.assert_close(a["image"], b["image"])
    assert resumed.state_dict() == {"epoch": 2, "batches_consumed": 0, "samples_read": [None]}


def test_trainer_checkpoint_mid_epoch_resumes_the_same_batches(shapes_root, tmp_path):
    import pytorch_lightning as pl

    class KeyRecorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, tuple(batch["key"])))
            return (self.weight - batch["image"].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class SaveAt(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 12:  # epoch 1, batch 4 of 8
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    def fit(callbacks=(), ckpt_path=None):
        model = KeyRecorder()
        trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=shapes_module(shapes_root, num_workers=0), ckpt_path=ckpt_path)
        return model.seen

    straight = fit([SaveAt()])
    resumed = fit(ckpt_path=str(tmp_path / "mid.ckpt"))
    assert len(straight) == 24 and resumed == straight[12:]


# --- bad input: skipped and counted where it is decoded, or refused before training ---------------------

def test_resume_after_a_batch_of_only_corrupt_samples_trains_no_sample_twice(tmp_path):
    """Batch 1 reads two corrupt samples, then reads on to a good one: 3 raw samples, not batch_size."""
    good = _shapes_samples(7)
    bad = [(f"bad{i:05d}", {"png": b"not a png", "txt": b"x"}) for i in range(2)]
    write_shard(str(tmp_path / "a.tar"), good[:2] + bad + good[2:])
    update_sizes(str(tmp_path), {"a.tar": 9})

    def module() -> WebDataModule:
        return WebDataModule(str(tmp_path / "a.tar"), resolution=RES, batch_size=2, num_workers=0, shuffle_buffer=1)

    straight = module()
    with pytest.warns(RuntimeWarning, match="cannot be decoded"):
        iterator = iter(straight.train_dataloader())
        first = [next(iterator)["key"] for _ in range(2)]
    assert first == [["00000000", "00000001"], ["00000002"]]
    state = straight.state_dict()
    assert state["samples_read"] == [[5]] and straight.num_skipped == 2
    remaining = [batch["key"] for batch in iterator]

    resumed = module()
    resumed.load_state_dict(state)
    replay = [batch["key"] for batch in resumed.train_dataloader()]
    assert replay == remaining and replay[0] == ["00000003", "00000004"]


def test_each_rank_resumes_from_its_own_raw_sample_count(tmp_path, monkeypatch):
    """Ranks meet different corrupt samples, so the checkpoint keeps every rank's raw counts."""
    good = _shapes_samples(8)
    bad = [(f"bad{i:05d}", {"png": b"not a png", "txt": b"x"}) for i in range(2)]
    write_shard(str(tmp_path / "a.tar"), good[:4])  # rank 0
    write_shard(str(tmp_path / "b.tar"), bad + good[4:])  # rank 1: its first batch reads 2 corrupt + 1 good
    update_sizes(str(tmp_path), {"a.tar": 4, "b.tar": 6})
    urls = str(tmp_path / "{a,b}.tar")

    def rank_run(rank: int, state: dict | None = None) -> tuple[list, dict]:
        simulate_rank(monkeypatch, rank, 2)
        dm = WebDataModule(urls, resolution=RES, batch_size=2, num_workers=0, shuffle_buffer=1)
        if state is not None:
            dm.load_state_dict(state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            iterator = iter(dm.train_dataloader())
            first = [] if state is not None else [next(iterator)["key"]]
            after_first = dm._position()
            return first + [batch["key"] for batch in iterator], after_first

    straight = [rank_run(rank) for rank in (0, 1)]
    assert [position["samples_read"] for _, position in straight] == [[2], [3]]
    assert straight[1][0][:2] == [["00000004"], ["00000005", "00000006"]]
    state = {"epoch": 0, "batches_consumed": 1, "samples_read": [[2], [3]]}  # what a 2-rank checkpoint holds
    for rank in (0, 1):
        assert rank_run(rank, state)[0] == straight[rank][0][1:]


@pytest.mark.parametrize("cls, reason", [(b"999", "class 999 is not in [0, 21)"), (b"-1", "class -1 is not in"),
                                         (b"three", "not an integer"), (None, "has no class (.cls)")])
def test_class_labels_outside_the_models_classes_are_skipped_and_counted(tmp_path, cls, reason):
    good = _shapes_samples(3)
    fields = {"png": good[0][1]["png"], "txt": b"a caption"} | ({"cls": cls} if cls is not None else {})
    write_shard(str(tmp_path / "a.tar"), [*good, ("badlabel", fields)])
    dm = WebDataModule(str(tmp_path / "a.tar"), resolution=RES, batch_size=4, num_workers=0, num_classes=21)
    with pytest.warns(RuntimeWarning, match=re.escape(reason)):
        (batch,) = list(dm.train_dataloader())
    assert sorted(batch["key"]) == ["00000000", "00000001", "00000002"] and batch["num_skipped"] == 1
    assert all(0 <= label < 21 for label in batch["class_label"].tolist())


def test_captions_that_are_not_utf8_are_skipped_and_counted(tmp_path):
    good = _shapes_samples(2)
    write_shard(str(tmp_path / "a.tar"), [*good, ("badtext0", {"png": good[0][1]["png"], "txt": b"\xff\xfe caption"})])
    dm = WebDataModule(str(tmp_path / "a.tar"), resolution=RES, batch_size=3, num_workers=0)
    with pytest.warns(RuntimeWarning, match="caption .* not UTF-8"):
        (batch,) = list(dm.train_dataloader())
    assert sorted(batch["key"]) == ["00000000", "00000001"] and dm.num_skipped == 1


def test_latent_cache_labels_are_checked_like_image_labels():
    from ldm.data.latent_cache import decode_latent_sample
    from ldm.data.transforms import CorruptSample

    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, 2, 2), np.float32))
    raw = {"__key__": "k", "mean.npy": buffer.getvalue(), "std.npy": buffer.getvalue(), "txt": b"", "cls": b"30"}
    assert decode_latent_sample(raw)["class_label"] == 30
    with pytest.raises(CorruptSample, match="class 30 is not in"):
        decode_latent_sample(raw, num_classes=21)


def sixteen_bit_png(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
    return buffer.getvalue()


def test_sixteen_bit_grayscale_png_is_scaled_to_eight_bits_in_training_and_inspection(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("inspect_shards", REPO / "data" / "inspect_shards.py")
    inspect_shards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inspect_shards)
    ramp = np.linspace(0, 65535, RES * RES).reshape(RES, RES)
    write_shard(str(tmp_path / "a.tar"), [("gray0000", {"png": sixteen_bit_png(ramp), "txt": b"a gray ramp"})])
    dm = WebDataModule(str(tmp_path / "a.tar"), resolution=RES, batch_size=1, num_workers=0)
    (batch,) = list(dm.train_dataloader())
    pixels = (batch["image"][0] + 1) * 127.5
    expected = torch.from_numpy(np.rint(ramp * 255 / 65535)).float()
    for channel in pixels:  # not clipped at 255 (almost white) but scaled: round(v * 255 / 65535)
        torch.testing.assert_close(channel, expected, atol=1e-3, rtol=0)
    summary, thumbnails = inspect_shards.inspect([str(tmp_path / "a.tar")], None, 1, RES)
    assert summary["corrupt"] == 0
    torch.testing.assert_close(thumbnails[0][0].float(), expected, atol=0, rtol=0)


def test_a_shard_set_without_a_readable_sample_is_an_error_before_training(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.tar").write_bytes(b"this is not a tar file" * 100)
    dm = WebDataModule(str(tmp_path / "{a,b}.tar"), resolution=RES, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match="hold no readable sample.*inspect_shards.py"):
        dm.train_dataloader()


def test_shards_where_no_sample_decodes_stop_with_a_message_instead_of_reading_forever(tmp_path):
    bad = [(f"bad{i:05d}", {"png": b"not a png", "txt": b"x"}) for i in range(4)]
    write_shard(str(tmp_path / "a.tar"), bad)
    dm = WebDataModule(str(tmp_path / "a.tar"), resolution=RES, batch_size=2, num_workers=0)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="in a row .* no sample decodes"):
        list(dm.train_dataloader())


# --- helpers -------------------------------------------------------------------------------------------

def _read_tar(path: str) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def _shapes_samples(count: int) -> list[tuple[str, dict[str, bytes]]]:
    rng, samples = np.random.default_rng(0), []
    for i in range(count):
        image, attributes = render_sample(rng, resolution=RES)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        samples.append((f"{i:08d}", {"png": buffer.getvalue(), "txt": attributes["caption"].encode(),
                                     "cls": str(attributes["class_label"]).encode()}))
    return samples
