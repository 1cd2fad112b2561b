"""Scale-out on CPU (gloo): 2-process DDP of both stages through train.py under Hydra, 2 nodes x 1 process,
FSDP wrap policy and a real FSDP2 sharded step, the SLURM / submitit launch path.

Every multi-process run goes through `run_with_hard_timeout`, which kills the whole process group, so a
hang fails the test instead of stalling CI.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from ldm.data.shapes import shapes_urls
from ldm.data.shards import expand_urls
from ldm.nets.attention import Attention, BasicTransformerBlock, SpatialTransformer
from ldm.nets.unet import Downsample, ResBlock, UNetModel
from ldm.nets.vae import AutoencoderNet, ResnetBlock
from ldm.training.distributed import (
    LAUNCHER_ENV_VARS,
    cluster_plugins,
    fsdp_unit_names,
    fsdp_wrap_policy,
    fully_shard_units,
    hydra_ddp_job,
)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
HARD_TIMEOUT_S = 300
TINY_DATA = ["data.resolution=32", "data.num_train=32", "data.num_val=8", "data.samples_per_shard=8",
             "data.batch_size=4"]
TINY_LDM = ["model.unet.channel_mult=[1,2]", "model.unet.attention_resolutions=[1,2]",
            "callbacks.sample_grid.every_n_steps=2", "sampling.steps=2",
            "callbacks.sample_grid.samples_per_condition=1"]
CPU_RUN = ["size=tiny", "trainer.precision=32-true", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]


# ----------------------------------------------------------------------------- helpers (also used by
# test_fault_tolerance.py)
def run_with_hard_timeout(args: list[str], env: dict[str, str] | None = None, timeout: float = HARD_TIMEOUT_S,
                          cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout SIGKILL the group (DDP children included)."""
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args[:4])} ... hung for {timeout} s and was killed:\n{out[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, None)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Offline, one thread per process, this directory importable (for the probe callbacks)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV_VARS + ("RANK",)}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS), **extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(code: str, world_size: int = 2) -> list[str]:
    """`python -c code` as ranks 0..world_size-1 of one gloo group on a free port; fails with every rank's output
    unless all exit 0, and kills each process group that outlives HARD_TIMEOUT_S."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True,
                              env=subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                                 WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank)))
             for rank in range(world_size)]
    try:
        outputs = [proc.communicate(timeout=HARD_TIMEOUT_S)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert all(proc.returncode == 0 for proc in procs), "\n".join(o[-3000:] for o in outputs)
    return outputs


def train_command(*overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *overrides]


def probe_overrides(out_dir: Path) -> list[str]:
    return ["+callbacks.probe._target_=test_distributed.RankProbe", f"+callbacks.probe.out_dir={out_dir}"]


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class RankProbe(pl.Callback):
    """Writes, per rank and stage, the batch keys it trained on and digests of its final weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.keys: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys += list(batch["key"])

    def on_train_end(self, trainer, pl_module) -> None:
        state = pl_module.state_dict()
        record = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "keys": self.keys,
            "weights": state_digest({k: v for k, v in state.items() if not k.startswith("ema.")}),
            "ema": state_digest({k: v for k, v in state.items() if k.startswith("ema.")}),
            "scale_factor": float(state["scale_factor"]) if "scale_factor" in state else None,
        }
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"{type(pl_module).__name__}_rank{trainer.global_rank}.json")
        with open(path, "w") as file:
            json.dump(record, file)


def read_probes(out_dir: Path, stage: str) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(out_dir.glob(f"{stage}_rank*.json"))]
    assert records, f"no probe records for {stage} in {out_dir}"
    return records


def shard_keys(data_dir: Path, num_train: int, samples_per_shard: int) -> set[str]:
    urls = expand_urls(shapes_urls(str(data_dir / "shapes_32px"), num_train, 8, samples_per_shard)["train"])
    keys = set()
    for url in urls:
        with tarfile.open(url) as tar:
            keys |= {name.split(".", 1)[0] for name in tar.getnames()}
    return keys


# ----------------------------------------------------------------------------- DDP through train.py
@pytest.mark.slow
def test_ddp_two_ranks_both_stages_one_run_dir_exact_epoch_identical_weights(tmp_path):
    """`-m` + DDP (2 ranks x 2 workers, gloo): stage 1 then stage 2 in one job. One run directory for the job;
    each training sample seen once per epoch over the ranks; both ranks end with identical weights and EMA."""
    probes = tmp_path / "probes"
    args = train_command(
        "-m", "experiment=ldm_f8_text", *CPU_RUN, *TINY_DATA, *TINY_LDM, "data.num_workers=2",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        # stage 1: 4 steps = one epoch of 32 samples over 2 ranks x batch 4
        "first_stage.overrides=['trainer.max_steps=4','trainer.val_check_interval=4','data.batch_size=4',"
        f"'model.loss.perceptual_weight=0','+callbacks.probe._target_=test_distributed.RankProbe',"
        f"'+callbacks.probe.out_dir={probes}']",
        *probe_overrides(probes),
        f"paths.log_dir={tmp_path}/outputs", f"paths.cache_dir={tmp_path}/cache", f"paths.data_dir={tmp_path}/data",
        "hydra.sweep.subdir=${hydra.job.num}",
    )
    proc = run_with_hard_timeout(args, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-4000:]

    sweeps = list((tmp_path / "outputs" / "ldm_f8_text" / "multiruns").iterdir())
    assert len(sweeps) == 1, f"DDP ranks created several sweep directories: {sweeps}"
    assert not (tmp_path / "outputs" / "ldm_f8_text" / "runs").exists()
    job_dir = sweeps[0] / "0"
    assert (job_dir / "checkpoints" / "last.ckpt").is_file()
    assert (job_dir / "train_ddp_process_1.log").is_file()  # rank 1 logged into the job's directory
    assert (job_dir / "images" / "samples_step0000002.png").is_file()

    autoencoder = read_probes(probes, "AutoencoderKL")
    diffusion = read_probes(probes, "LatentDiffusion")
    for records in (autoencoder, diffusion):
        assert [r["global_rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
        assert records[0]["weights"] == records[1]["weights"]
        assert records[0]["ema"] == records[1]["ema"]
    assert diffusion[0]["scale_factor"] == diffusion[1]["scale_factor"]
    assert torch.isfinite(torch.tensor(diffusion[0]["scale_factor"]))

    rank_keys = [r["keys"] for r in autoencoder]
    assert len(rank_keys[0]) == len(rank_keys[1]) == 16
    seen = rank_keys[0] + rank_keys[1]
    assert len(set(seen)) == len(seen), "a sample was trained on twice in one epoch"
    assert set(seen) == shard_keys(tmp_path / "data", num_train=32, samples_per_shard=8)


@pytest.mark.slow
def test_two_nodes_one_process_each_train_and_checkpoint(tmp_path):
    """trainer=multinode with num_nodes=2, devices=1: two train.py processes joined by MASTER_ADDR/PORT."""
    port = str(free_port())
    probes = tmp_path / "probes"
    args = train_command(
        "experiment=ae_kl_f8", *CPU_RUN, *TINY_DATA, "data.num_workers=0", "model.loss.perceptual_weight=0",
        "trainer=multinode", "trainer.num_nodes=2", "trainer.devices=1", "trainer.accelerator=cpu",
        "trainer.max_steps=2", "trainer.val_check_interval=2", *probe_overrides(probes),
        f"paths.log_dir={tmp_path}/outputs", f"paths.cache_dir={tmp_path}/cache", f"paths.data_dir={tmp_path}/data",
        f"hydra.run.dir={tmp_path}/run",  # one directory on a shared file system
    )
    env = {rank: subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", NODE_RANK=str(rank))
           for rank in (0, 1)}
    node1 = subprocess.Popen(args, env=env[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        node0 = run_with_hard_timeout(args, env=env[0])
        out1, _ = node1.communicate(timeout=60)
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
    assert node0.returncode == 0, node0.stdout[-3000:]
    assert node1.returncode == 0, out1[-3000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    records = read_probes(probes, "AutoencoderKL")
    assert [r["global_rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
    assert records[0]["weights"] == records[1]["weights"]


def test_hydra_ddp_job_restores_launcher_environment(monkeypatch):
    """After a job, the launching process forgets its ranks, so the next job of a sweep launches its own."""
    for name in LAUNCHER_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    with hydra_ddp_job():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="1234", LOCAL_RANK="0", WORLD_SIZE="2")
    assert not any(name in os.environ for name in LAUNCHER_ENV_VARS)


# ----------------------------------------------------------------------------- FSDP
def tiny_unet() -> UNetModel:
    return UNetModel(in_channels=4, out_channels=4, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                     attention_resolutions=[2], num_heads=2, context_dim=8, norm_groups=8)


def test_fsdp_config_composes_with_wrap_policy_and_state_dict_type():
    from pytorch_lightning.strategies import FSDPStrategy

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=ldm_f8_text", "trainer=fsdp", "trainer.strategy.state_dict_type=sharded",
            "trainer.accumulate_grad_batches=4", "trainer.gradient_clip_val=1.0"])
    from hydra.utils import instantiate

    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy._state_dict_type == "sharded"
    assert strategy.mixed_precision.param_dtype == torch.bfloat16
    assert strategy.mixed_precision.buffer_dtype == torch.float32  # EMA shadows and scale_factor stay fp32
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accumulate_grad_batches == 4

    policy = strategy.kwargs["auto_wrap_policy"]
    unet, vae = tiny_unet(), AutoencoderNet(embed_dim=4, z_channels=4, ch=16, ch_mult=[1, 2], num_res_blocks=1,
                                           attention_resolutions=[], norm_groups=8)
    for module in [*unet.modules(), *vae.modules()]:
        expected = isinstance(module, (ResBlock, BasicTransformerBlock, SpatialTransformer, ResnetBlock))
        assert policy(module=module, recurse=False, nonwrapped_numel=0) == expected, type(module)
    names = fsdp_unit_names(unet)
    assert "input_blocks.3.0" in names and "input_blocks.3.1" in names  # ResBlock, SpatialTransformer
    assert "input_blocks.3.1.transformer_blocks.0" in names               # nested BasicTransformerBlock
    assert not any(isinstance(dict(unet.named_modules())[n], (Downsample, Attention)) for n in names)
    assert len(fsdp_unit_names(vae)) == sum(isinstance(m, ResnetBlock) for m in vae.modules())
    assert isinstance(fsdp_wrap_policy(), type(policy))


def fsdp2_worker(out_path: str) -> None:
    """One rank of a 2-process FSDP2 step (run in a subprocess by the test below)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    unet, (x, t, context) = fsdp2_problem()
    fully_shard_units(unet, mesh=init_device_mesh("cpu", (world,)))
    sharded = [p for p in unet.parameters() if p.to_local().numel() < p.numel()]
    unet.zero_grad()
    half = x.shape[0] // world
    part = slice(rank * half, (rank + 1) * half)
    unet(x[part], t[part], context=context[part]).square().mean().backward()
    torch.optim.SGD(unet.parameters(), lr=0.1).step()
    full = {name: value.full_tensor() for name, value in unet.state_dict().items()}
    units = sum(isinstance(m, FSDPModule) for m in unet.modules())
    if rank == 0:
        torch.save({"state": full, "units": units, "sharded_params": len(sharded)}, out_path)
    dist.destroy_process_group()


def fsdp2_problem():
    torch.manual_seed(0)
    unet = tiny_unet()
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 4, 8, 8, generator=generator), torch.randint(0, 1000, (4,), generator=generator),
             torch.randn(4, 3, 8, generator=generator))
    return unet, batch


@pytest.mark.slow
def test_fsdp2_sharded_step_matches_single_process(tmp_path):
    """FSDP2 `fully_shard` at the policy's units, 2 ranks over gloo: the weights after one step equal a
    single-process step on the whole batch, and the state dict keeps the unsharded key layout."""
    out = tmp_path / "fsdp2.pt"
    run_ranks(f"import test_distributed as t; t.fsdp2_worker({str(out)!r})")

    unet, (x, t, context) = fsdp2_problem()
    unet(x, t, context=context).square().mean().backward()
    torch.optim.SGD(unet.parameters(), lr=0.1).step()
    result = torch.load(out, weights_only=True)
    assert result["units"] == len(fsdp_unit_names(unet)) + 1  # every unit and the root
    assert result["sharded_params"] > 0
    reference = unet.state_dict()
    assert set(result["state"]) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(result["state"][name], value, atol=1e-6, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------- SLURM / submitit
def test_slurm_launcher_asks_for_one_task_per_gpu_and_the_requeue_signal(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "trainer=multinode", "trainer.num_nodes=4", "trainer.devices=8",
            "hydra.launcher.partition=gpu", "experiment=ldm_f8_text"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    params = {"nodes": launcher.nodes, "ntasks_per_node": launcher.tasks_per_node,
              "gpus_per_node": launcher.gpus_per_node, "time": launcher.timeout_min,
              "partition": launcher.partition, "signal_delay_s": launcher.signal_delay_s,
              "setup": list(launcher.setup), "additional_parameters": dict(launcher.additional_parameters)}
    sbatch = _make_sbatch_string(command="python -m submitit.core._submit x", folder=str(tmp_path), **params)
    for line in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                 "--signal=USR1@120", "--requeue"]:
        assert f"#SBATCH {line}" in sbatch
    assert "--signal=USR2" not in sbatch
    assert launcher.max_num_timeout > 0


def test_cluster_plugins_requeue_under_slurm_until_the_limit(monkeypatch):
    from lightning_fabric.plugins.environments import SLURMEnvironment

    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert cluster_plugins() == []
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    monkeypatch.setenv("SLURM_JOB_NAME", "ldm")
    monkeypatch.setattr("ldm.training.distributed.max_requeues", lambda: 2)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    (plugin,) = cluster_plugins()
    assert isinstance(plugin, SLURMEnvironment) and plugin.auto_requeue and plugin.requeue_signal == signal.SIGUSR1
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert not cluster_plugins()[0].auto_requeue


@pytest.mark.slow
def test_submitit_local_multirun_trains_and_checkpoints(tmp_path):
    """The SLURM path, run locally: the job is pickled, started by submitit, and writes its checkpoint."""
    args = train_command(
        "-m", "hydra/launcher=submitit_local", "experiment=ae_kl_f8", *CPU_RUN, *TINY_DATA,
        "data.num_workers=0", "model.loss.perceptual_weight=0", "trainer.max_steps=2",
        "trainer.val_check_interval=2", f"paths.log_dir={tmp_path}/outputs", f"paths.cache_dir={tmp_path}/cache",
        f"paths.data_dir={tmp_path}/data", "hydra.sweep.subdir=${hydra.job.num}",
    )
    proc = run_with_hard_timeout(args, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    (sweep,) = (tmp_path / "outputs" / "ae_kl_f8" / "multiruns").iterdir()
    checkpoint = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert list((sweep / ".submitit").iterdir())  # it really went through submitit
