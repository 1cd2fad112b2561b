"""A long run survives interruption without losing work: exact resume (weights, EMA, optimizer, LR schedule,
step, scale_factor, RNG, data position), SIGTERM / SIGUSR1 checkpoints, SIGKILL during a checkpoint write,
and NaN / inf steps that are skipped, counted and, too many in a row, stop the run."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from test_distributed import (
    CPU_RUN,
    REPO,
    TINY_DATA,
    TINY_LDM,
    run_with_hard_timeout,
    subprocess_env,
    train_command,
)

from ldm.training.pipeline import train
from ldm.training.preemption import PREEMPTED_EXIT_CODE, get_rng_states, set_rng_states
from ldm.utils.files import load_checkpoint

CHANGES: dict[str, dict[int, bool]] = {}  # InjectNaN records, by name: step -> did the weights change


class InjectNaN(pl.Callback):
    """Makes the images of the given batches (counted from 0) NaN and records whether each batch changed the
    trained weights (batches, not global steps: a skipped stage-1 step does not advance the global step)."""

    def __init__(self, name: str, batches: list[int], prefixes: list[str]) -> None:
        self.name, self.batches, self.prefixes = name, set(batches), tuple(prefixes)
        self.batch = 0
        self._before: dict[str, torch.Tensor] = {}
        CHANGES[name] = {}

    def _weights(self, pl_module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.state_dict().items() if k.startswith(self.prefixes)}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batch in self.batches:
            batch["image"].fill_(float("nan"))
        self._before = self._weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = self._weights(pl_module)
        CHANGES[self.name][self.batch] = any(not torch.equal(after[k], v) for k, v in self._before.items())
        self.batch += 1


class SignalAtStep(pl.Callback):
    """Sends `signum` to this process when `step` training steps are done (a scheduler's preemption)."""

    def __init__(self, step: int, signum: str) -> None:
        self.step, self.signum = step, getattr(signal, signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class StepFile(pl.Callback):
    """Writes the global step after every training step, so another process can follow the run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(self.path + ".part", "w") as file:
            file.write(str(trainer.global_step))
        os.replace(self.path + ".part", self.path)


def run_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return train(compose(config_name="train", overrides=overrides))


def base_overrides(root: Path, data_dir: Path, output: str) -> list[str]:
    return [*CPU_RUN, *TINY_DATA, f"paths.output_dir={root}/{output}", f"paths.log_dir={root}/outputs",
            f"paths.cache_dir={root}/cache", f"paths.data_dir={data_dir}"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def first_stage_ckpt(tmp_path_factory, data_dir) -> str:
    root = tmp_path_factory.mktemp("stage1")
    result = run_train(["experiment=ae_kl_f8", *base_overrides(root, data_dir, "ae"), "data.num_workers=0",
                        "model.loss.perceptual_weight=0", "trainer.max_steps=2", "trainer.val_check_interval=2"])
    return result.last_ckpt


def ldm_overrides(root: Path, data_dir: Path, first_stage: str, output: str, workers: int) -> list[str]:
    """6 steps over epochs of 4 batches (16 samples, 2 shards): resume at step 3 is mid-epoch, and the
    run crosses an epoch boundary. Validation after step 3 draws random numbers; warm-up moves the LR."""
    return [
        "experiment=ldm_f8_text", *base_overrides(root, data_dir, output), *TINY_LDM, "data.num_train=16",
        f"data.num_workers={workers}", f"model.first_stage_ckpt={first_stage}", "model.learning_rate=1e-3",
        "model.warmup_steps=4", "model.ema_decay=0.9", "trainer.max_steps=6", "trainer.val_check_interval=3",
        "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.sample_grid.every_n_steps=100",
    ]


def trained_state(ckpt: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(ckpt)["state_dict"]


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=1e-6, rtol=1e-5, msg=name)


@pytest.fixture(scope="module", params=[0, 2], ids=["workers0", "workers2"])
def straight_run(request, tmp_path_factory, data_dir, first_stage_ckpt):
    """The reference: 6 steps without interruption (checkpoints at steps 3 and 6)."""
    root = tmp_path_factory.mktemp(f"straight{request.param}")
    result = run_train(ldm_overrides(root, data_dir, first_stage_ckpt, "straight", request.param))
    assert result.trainer.global_step == 6
    (mid_run,) = glob.glob(f"{result.output_dir}/checkpoints/step*3.ckpt")
    return {"workers": request.param, "final": trained_state(result.last_ckpt), "mid_run": mid_run}


@pytest.mark.slow
def test_resume_from_mid_run_checkpoint_matches_straight_run(tmp_path, data_dir, first_stage_ckpt, straight_run):
    overrides = ldm_overrides(tmp_path, data_dir, first_stage_ckpt, "resumed", straight_run["workers"])
    result = run_train([*overrides, f"ckpt_path={straight_run['mid_run']}"])
    assert result.trainer.global_step == 6
    final = trained_state(result.last_ckpt)
    assert torch.isfinite(final["scale_factor"])
    assert_same_state(final, straight_run["final"])  # EMA included


def test_mid_run_checkpoint_holds_the_ema_of_its_step(straight_run):
    mid_run = load_checkpoint(straight_run["mid_run"])
    assert int(mid_run["state_dict"]["ema.num_updates"]) == mid_run["global_step"] == 3


@pytest.mark.slow
def test_sigusr1_saves_last_checkpoint_and_resume_matches_straight_run(tmp_path, data_dir, first_stage_ckpt,
                                                                        straight_run):
    overrides = ldm_overrides(tmp_path, data_dir, first_stage_ckpt, "preempted", straight_run["workers"])
    with pytest.raises(SystemExit) as stopped:
        run_train([*overrides, "+callbacks.preempt._target_=test_fault_tolerance.SignalAtStep",
                   "+callbacks.preempt.step=2", "+callbacks.preempt.signum=SIGUSR1"])
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    last = tmp_path / "preempted" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 2
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored after the run

    # the same run directory again, no ckpt_path: what a requeued SLURM job does
    resumed = run_train(overrides)
    assert resumed.trainer.global_step == 6
    assert_same_state(trained_state(resumed.last_ckpt), straight_run["final"])


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    states = get_rng_states()
    torch.save(states, tmp_path / "rng.pt")
    expected = torch.rand(3)
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------- signals to a real train.py
def stage1_command(log_dir: Path, data_dir: Path, run: str, *overrides: str) -> list[str]:
    return train_command(
        "experiment=ae_kl_f8", *CPU_RUN, *TINY_DATA, "data.num_workers=0", "model.loss.perceptual_weight=0",
        "trainer.val_check_interval=1000", f"paths.log_dir={log_dir}", f"paths.cache_dir={log_dir}/cache",
        f"paths.data_dir={data_dir}", f"hydra.run.dir={log_dir}/ae_kl_f8/runs/{run}", *overrides)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the run ended or stalled before the condition held:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.0005)


def read_step(path: Path) -> int:
    return int(path.read_text()) if path.exists() else -1


def resume_last(log_dir: Path, data_dir: Path, max_steps: int) -> None:
    proc = run_with_hard_timeout(stage1_command(log_dir, data_dir, "resumed", "ckpt_path=last",
                                                f"trainer.max_steps={max_steps}"), env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "runs/first/checkpoints/last.ckpt" in proc.stdout  # Lightning's "Restoring states from ..."
    # the run continues in its own directory ("resumed" is only this launch's Hydra directory)
    final = load_checkpoint(log_dir / "ae_kl_f8" / "runs" / "first" / "checkpoints" / "last.ckpt")
    assert final["global_step"] == max_steps
    assert not (log_dir / "ae_kl_f8" / "runs" / "resumed" / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_at_the_step_reached_and_resume_continues(tmp_path, data_dir):
    steps = tmp_path / "step"
    proc = start(stage1_command(tmp_path, data_dir, "first", "trainer.max_steps=100000",
                                "+callbacks.steps._target_=test_fault_tolerance.StepFile",
                                f"+callbacks.steps.path={steps}"))
    wait_for(lambda: read_step(steps) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    reached = read_step(steps)
    last = load_checkpoint(tmp_path / "ae_kl_f8" / "runs" / "first" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == reached >= 3
    resume_last(tmp_path, data_dir, max_steps=reached + 2)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_and_resume_works(tmp_path, data_dir):
    """Checkpoint every step; freeze the process while a `.last.ckpt.*.tmp` exists, then SIGKILL it."""
    checkpoints = tmp_path / "ae_kl_f8" / "runs" / "first" / "checkpoints"
    steps = tmp_path / "step"
    proc = start(stage1_command(tmp_path, data_dir, "first", "trainer.max_steps=100000",
                                "callbacks.model_checkpoint.every_n_train_steps=1",
                                "callbacks.model_checkpoint.save_top_k=1",
                                "+callbacks.steps._target_=test_fault_tolerance.StepFile",
                                f"+callbacks.steps.path={steps}"))

    def caught_mid_write() -> bool:
        if read_step(steps) < 2 or not list(checkpoints.glob(".last.ckpt.*.tmp")):
            return False
        os.killpg(proc.pid, signal.SIGSTOP)
        if list(checkpoints.glob(".last.ckpt.*.tmp")):
            return True
        os.killpg(proc.pid, signal.SIGCONT)  # the write finished in between: try the next one
        return False

    wait_for(caught_mid_write, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert list(checkpoints.glob(".last.ckpt.*.tmp")), "the kill did not land during a write"
    previous = load_checkpoint(checkpoints / "last.ckpt")  # complete, not truncated
    assert previous["global_step"] >= 1
    resume_last(tmp_path, data_dir, max_steps=previous["global_step"] + 1)


# ----------------------------------------------------------------------------- NaN / inf
def nan_overrides(name: str, batches: list[int], prefixes: list[str]) -> list[str]:
    return ["+callbacks.nan._target_=test_fault_tolerance.InjectNaN", f"+callbacks.nan.name={name}",
            f"+callbacks.nan.batches={batches}", f"+callbacks.nan.prefixes={prefixes}",
            "callbacks.model_checkpoint.every_n_train_steps=1"]


def test_latent_diffusion_skips_nonfinite_steps_and_stops_after_too_many_in_a_row(tmp_path, data_dir,
                                                                                  first_stage_ckpt):
    overrides = [*ldm_overrides(tmp_path, data_dir, first_stage_ckpt, "nan", 0), "trainer.max_steps=10",
                 "cache_latents=false",  # the faults are injected into the image batches
                 "model.max_nonfinite_steps=3", *nan_overrides("ldm", [1, 3, 4, 5], ["unet.", "conditioner."])]
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row"):
        run_train(overrides)
    changed = CHANGES["ldm"]
    assert changed[0] and changed[2], "finite steps train"
    assert not any(changed[i] for i in (1, 3, 4, 5)), "NaN steps leave the weights alone"
    assert 6 not in changed, "the run stopped after the third NaN step in a row"
    last = trained_state(str(tmp_path / "nan" / "checkpoints" / "last.ckpt"))
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())


def test_autoencoder_skips_nonfinite_steps_and_counts_them(tmp_path, data_dir):
    overrides = ["experiment=ae_kl_f8", *base_overrides(tmp_path, data_dir, "ae_nan"), "data.num_workers=0",
                 "model.loss.perceptual_weight=0", "trainer.max_steps=3", "trainer.val_check_interval=3",
                 *nan_overrides("ae", [1, 2], ["vae."])]
    result = run_train(overrides)
    assert result.trainer.global_step == 3  # skipped steps do not count
    assert CHANGES["ae"] == {0: True, 1: False, 2: False, 3: True, 4: True}
    assert result.trainer.lightning_module.nonfinite_steps == 2


def test_autoencoder_stopped_by_the_guard_saves_its_last_good_weights_in_this_run_and_names_them(tmp_path, data_dir):
    """Skipped stage-1 steps do not advance global_step, so no periodic checkpoint is written during a run of
    them: the stop itself must save the (still good) weights, here, and say where."""
    run_dir = tmp_path / "ae_stop"
    overrides = ["experiment=ae_kl_f8", *base_overrides(tmp_path, data_dir, "ae_stop"), "data.num_workers=0",
                 "model.loss.perceptual_weight=0", "trainer.max_steps=10", "trainer.val_check_interval=10",
                 "model.max_nonfinite_steps=3", *nan_overrides("ae_stop", [1, 2, 3, 4], ["vae."]),
                 "callbacks.model_checkpoint.every_n_train_steps=500"]
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row") as stopped:
        run_train(overrides)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"saved in {last}" in str(stopped.value) and f"ckpt_path={last}" in str(stopped.value)
    saved = load_checkpoint(last)
    assert saved["global_step"] == 1  # the one good step
    assert CHANGES["ae_stop"] == {0: True, 1: False, 2: False}  # the NaN batches left the weights alone
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_stale_partial_checkpoints_of_killed_writes_are_removed_at_start_up(tmp_path, data_dir):
    checkpoints = tmp_path / "ae_tmp" / "checkpoints"
    checkpoints.mkdir(parents=True)
    stale = [checkpoints / ".last.ckpt.4242.0123abcd.tmp", checkpoints / ".step0000002.ckpt.77.deadbeef.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 4096)  # what a SIGKILL during save_atomic leaves
    kept = checkpoints / "notes.tmp"
    kept.write_text("not ours")
    run_train(["experiment=ae_kl_f8", *base_overrides(tmp_path, data_dir, "ae_tmp"), "data.num_workers=0",
               "model.loss.perceptual_weight=0", "trainer.max_steps=1", "trainer.val_check_interval=1"])
    assert not any(path.exists() for path in stale) and kept.exists()
    assert (checkpoints / "last.ckpt").is_file()


def test_gradient_clipping_on_the_manually_optimised_autoencoder_is_a_clear_error(tmp_path, data_dir):
    overrides = ["experiment=ae_kl_f8", *base_overrides(tmp_path, data_dir, "ae_clip"), "trainer.max_steps=1",
                 "model.loss.perceptual_weight=0", "trainer.gradient_clip_val=1.0"]
    with pytest.raises(ValueError, match="gradient_clip_val=null for stage 1"):
        run_train(overrides)


# ----------------------------------------------------------------------------- SLURM: signals to the process group
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_to_the_whole_process_group_saves_last_checkpoint_with_dataloader_workers(tmp_path, data_dir, signum):
    """SLURM signals every process of the job step, DataLoader workers included: they must ignore it, and the
    main process checkpoint and exit 143 as when it alone is signalled."""
    steps = tmp_path / "step"
    proc = start(stage1_command(tmp_path, data_dir, "first", "trainer.max_steps=100000", "data.num_workers=1",
                                "+callbacks.steps._target_=test_fault_tolerance.StepFile",
                                f"+callbacks.steps.path={steps}"))
    wait_for(lambda: read_step(steps) >= 3, proc)
    os.killpg(proc.pid, signum)  # kill -TERM -- -PGID: the main process and its worker
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert "is killed by signal" not in out
    last = load_checkpoint(tmp_path / "ae_kl_f8" / "runs" / "first" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == read_step(steps) >= 3


# ----------------------------------------------------------------------------- "train longer": N == N/2 + N/2
def assert_same_tree(actual, expected, where: str = "") -> None:
    """Equal nested checkpoint entries: tensors to float tolerance, everything else exactly."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5, msg=where)
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_same_tree(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_tree(a, e, f"{where}/{i}")
    else:
        assert actual == expected, where


def assert_same_training_state(actual_ckpt: str, expected_ckpt: str) -> None:
    """Weights (EMA included), optimizer and LR-scheduler states, step and data position are identical."""
    actual, expected = load_checkpoint(actual_ckpt), load_checkpoint(expected_ckpt)
    assert actual["global_step"] == expected["global_step"]
    assert_same_state(actual["state_dict"], expected["state_dict"])
    assert_same_tree(actual["optimizer_states"], expected["optimizer_states"], "optimizer_states")
    assert_same_tree(actual["lr_schedulers"], expected["lr_schedulers"], "lr_schedulers")
    data_state = [key for key in expected if key.endswith("DataModule")]
    assert data_state and actual[data_state[0]] == expected[data_state[0]]


def train_longer(overrides: list[str], steps: int) -> tuple[str, str]:
    """(last.ckpt of `steps` straight, last.ckpt of steps/2 to the end then continued to `steps`)."""
    straight = run_train([*overrides[0], f"trainer.max_steps={steps}"])
    half = run_train([*overrides[1], f"trainer.max_steps={steps // 2}"])
    continued = run_train([*overrides[2], f"trainer.max_steps={steps}", f"ckpt_path={half.last_ckpt}"])
    assert continued.trainer.global_step == straight.trainer.global_step == steps
    return continued.last_ckpt, straight.last_ckpt


@pytest.mark.slow
@pytest.mark.parametrize("steps, workers", [(10, 0), (16, 2)], ids=["mid_epoch", "epoch_end_2_workers"])
def test_autoencoder_trained_longer_equals_a_straight_run(tmp_path, data_dir, steps, workers):
    """Epochs of 8 batches: 5 of 10 stop mid-epoch, 8 of 16 at the end of an epoch (2 workers: 4 + 4)."""
    def overrides(name: str) -> list[str]:
        return ["experiment=ae_kl_f8", *base_overrides(tmp_path, data_dir, name), f"data.num_workers={workers}",
                "model.loss.perceptual_weight=0", "model.loss.disc_start=3", "trainer.val_check_interval=4"]

    assert_same_training_state(*train_longer([overrides("straight"), overrides("half"), overrides("longer")], steps))


@pytest.mark.slow
@pytest.mark.parametrize("steps", [6, 8], ids=["mid_epoch", "epoch_end"])
def test_latent_diffusion_trained_longer_equals_a_straight_run(tmp_path, data_dir, first_stage_ckpt, steps):
    """Epochs of 4 batches: 3 of 6 stop mid-epoch, 4 of 8 at the end of an epoch."""
    runs = [ldm_overrides(tmp_path, data_dir, first_stage_ckpt, name, 0) for name in ("straight", "half", "longer")]
    assert_same_training_state(*train_longer(runs, steps))


# ----------------------------------------------------------------------------- scale_factor from finite latents
def cached_latent_batch(means: torch.Tensor) -> dict:
    """A cached-latent batch with zero std: its latents are exactly `means` (no random draw)."""
    return {"latent_mean": means, "latent_std": torch.zeros_like(means)}


@pytest.fixture
def unscaled_model():
    from test_export import TINY_MODEL

    from ldm.models.latent_diffusion import LatentDiffusion

    return LatentDiffusion(**{**TINY_MODEL, "scale_factor": None})


def test_scale_factor_ignores_samples_with_nonfinite_latents(unscaled_model):
    means = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(0)) * 3
    poisoned = means.clone()
    poisoned[1, 0, 0, 0] = float("inf")
    with pytest.warns(UserWarning, match="1 of 4 samples of the first batch have NaN/inf latents"):
        unscaled_model._init_scale_factor(cached_latent_batch(poisoned))
    expected = 1 / means[[0, 2, 3]].flatten().std()
    torch.testing.assert_close(unscaled_model.scale_factor, expected)


@pytest.mark.parametrize("value", [float("nan"), 0.0], ids=["all_nonfinite", "constant"])
def test_scale_factor_from_an_unusable_first_batch_is_refused_with_a_message_about_the_data(unscaled_model, value):
    with pytest.raises(ValueError, match=r"scale_factor from the first batch.*check the data.*model.scale_factor="):
        unscaled_model._init_scale_factor(cached_latent_batch(torch.full((2, 4, 2, 2), value)))


class InjectInf(pl.Callback):
    """Makes one image of the first training batch +inf (before the model estimates scale_factor from it)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            batch["image"][0].fill_(float("inf"))


def test_an_inf_image_in_the_first_batch_does_not_poison_scale_factor(tmp_path, data_dir, first_stage_ckpt):
    overrides = [*ldm_overrides(tmp_path, data_dir, first_stage_ckpt, "inf", 0), "trainer.max_steps=3",
                 "cache_latents=false",  # the inf is injected into the first image batch
                 "model.max_nonfinite_steps=2", "+callbacks.inf._target_=test_fault_tolerance.InjectInf"]
    with pytest.warns(UserWarning, match="NaN/inf latents"):
        result = run_train(overrides)
    # only the first step (its batch holds the inf image) is skipped; a NaN scale would make every step NaN
    assert result.trainer.global_step == 3 and result.trainer.lightning_module.nonfinite_guard.skipped_steps() == 1
    scale = trained_state(result.last_ckpt)["scale_factor"]
    assert torch.isfinite(scale) and scale > 0
