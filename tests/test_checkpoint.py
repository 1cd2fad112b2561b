"""Checkpoint I/O: weights-only loading refuses code, clear errors, atomic saves that survive crashes
and SIGKILL, and a Lightning Trainer saving and resuming through the plugin."""
import os
import signal
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

import ldm.training.checkpoint_io as checkpoint_module
from ldm.training.checkpoint_io import AtomicCheckpointIO
from ldm.utils.files import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    save_atomic,
)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: str, via_shell: bool) -> None:
        self.marker, self.via_shell = marker, via_shell

    def __reduce__(self):
        if self.via_shell:
            return os.system, (f"touch {self.marker}",)
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("via_shell, culprit", [(True, "posix.system"), (False, "exec")])
def test_code_carrying_pickle_is_refused_and_nothing_runs(tmp_path, via_shell, culprit):
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    payload = _RunsCodeWhenUnpickled(str(marker), via_shell)
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": payload}, path)
    with pytest.raises(UnsafeCheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and f"references {culprit}," in message
    assert "Nothing from the file was executed" in message
    assert not marker.exists()


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_truncated_checkpoint_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "half.ckpt"
    torch.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_checkpoint(path)


def test_safetensors_round_trip(tmp_path):
    tensors = {"unet.weight": torch.randn(3, 4), "unet.bias": torch.arange(3.0)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    loaded = load_checkpoint(tmp_path / "w.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_plain_hyperparameters_load_and_omegaconf_is_refused_with_a_hint(tmp_path):
    hparams = {"unet": {"ch": 32, "mult": [1, 2], "betas": (0.9, 0.999)}, "lr": 1e-4, "ckpt": None}
    save_atomic({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": hparams}, tmp_path / "ok.ckpt")
    assert load_checkpoint(tmp_path / "ok.ckpt")["hyper_parameters"] == hparams
    torch.save({"hyper_parameters": OmegaConf.create(hparams)}, tmp_path / "omega.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="OmegaConf.to_container"):
        load_checkpoint(tmp_path / "omega.ckpt")


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash_midway(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 partial bytes")
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the partial temporary file is cleaned up


_SIGKILL_CHILD = """
import os, signal, sys, torch
from ldm.utils.files import save_atomic

def killed_midway(obj, file, *args, **kwargs):
    file.write(b"PK\\x03\\x04 partial bytes")
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = killed_midway
save_atomic({"step": 2}, sys.argv[1])
"""


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    save_atomic({"step": 1}, path)
    child = subprocess.run([sys.executable, "-c", _SIGKILL_CHILD, str(path)], timeout=120, capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert load_checkpoint(path)["step"] == 1


def test_saved_files_honour_the_umask(tmp_path):
    save_atomic({"a": 1}, tmp_path / "x.ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "x.ckpt").st_mode & 0o777 == 0o666 & ~umask


class _TinyModule(pl.LightningModule):
    def __init__(self, net: dict, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(net["width"], 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _trainer(directory, max_steps: int) -> pl.Trainer:
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=directory, save_last=True)
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        plugins=[AtomicCheckpointIO()],
        callbacks=[checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_lightning_trainer_saves_and_resumes_through_the_plugin(tmp_path, monkeypatch):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    first = _trainer(tmp_path / "checkpoints", max_steps=4)  # one epoch
    first.fit(_TinyModule({"width": 4, "mult": [1, 2]}), data)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert not [f for f in os.listdir(last.parent) if f.endswith(".tmp")]

    loads = []
    safe_load = checkpoint_module.load_checkpoint

    def spy(path, **kwargs):
        loads.append(path)
        return safe_load(path, **kwargs)

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", spy)
    second = _trainer(tmp_path / "resumed", max_steps=8)
    resumed = _TinyModule({"width": 4, "mult": [1, 2]})
    second.fit(resumed, data, ckpt_path=str(last))
    assert os.fspath(loads[0]) == str(last)  # resumed through the weights-only loader
    assert second.global_step == 8 and isinstance(second.strategy.checkpoint_io, AtomicCheckpointIO)

    # Lightning's own loader (torch's weights-only default) reads our checkpoints too
    restored = _TinyModule.load_from_checkpoint(tmp_path / "resumed" / "last.ckpt")
    assert restored.hparams.net == {"width": 4, "mult": [1, 2]}
    assert torch.equal(restored.layer.weight, resumed.layer.weight)


def test_a_file_that_is_not_safetensors_is_refused_naming_it_and_the_fix(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(1)}, path)  # a torch checkpoint renamed
    with pytest.raises(CorruptCheckpointError) as error:
        load_checkpoint(path)
    assert f"{str(path)!r} is not a readable safetensors file" in str(error.value)
    assert "a torch .ckpt keeps its .ckpt name" in str(error.value)
