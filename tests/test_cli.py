"""The command line answers like a well-made tool: the real scripts, run as a user runs them (a subprocess, in
an empty working directory), say in one line what was wrong, exit with status 2 and leave nothing behind;
`--help` and `list` show the experiments; a paper-size run on the CPU says what it will cost."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ldm.cli.cost import cpu_cost_warning, estimate_cost
from ldm.models.conditioners import TextTransformer
from ldm.nets.unet import UNetModel

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "configs" / "experiment").glob("*.yaml"))


def run(script: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", **(env or {}))
    environment.pop("LDM_HOME", None)  # outputs would go to the working directory
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=timeout)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_sample_without_ckpt_names_the_key_and_an_example(tmp_path):
    proc = run("sample.py", cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith("error: sample.py needs ckpt=")
    assert "e.g. python sample.py ckpt=" in line and "last.ckpt" in line
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no empty outputs/samples/<date> (hydra.run.dir=${out})


@pytest.mark.parametrize("script, suggestion", [
    ("train.py", "data.batch_size=8"),
    ("sample.py", "batch_size=8"),        # sample.py has no data group: its own batch_size is nearest
    ("evaluate.py", "data.batch_size=8"),
])
def test_a_mistyped_key_gets_the_nearest_existing_key(tmp_path, script, suggestion):
    proc = run(script, "data.batchsize=8", cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert f"{script} has no key data.batchsize; did you mean {suggestion}" in line
    assert "+data.batchsize" not in proc.stderr + proc.stdout  # not Hydra's "append it" advice
    assert list(tmp_path.iterdir()) == []


def test_a_mistyped_option_in_a_sweep_is_found_before_anything_runs(tmp_path):
    proc = run("train.py", "-m", "experiment=ae_kl_f4,ae_kl_f9", cwd=tmp_path)
    assert proc.returncode == 2
    assert "experiment=ae_kl_f9 does not exist; did you mean experiment=ae_kl_f8" in one_line(proc.stderr)
    assert list(tmp_path.iterdir()) == []  # no multirun directory for the valid first job either


def test_a_sweep_without_multirun_says_to_add_m(tmp_path):
    proc = run("train.py", "experiment=ae_kl_f4,ae_kl_f8", cwd=tmp_path)
    assert proc.returncode == 2
    assert "experiment=ae_kl_f4,ae_kl_f8 is a sweep: add -m" in one_line(proc.stderr)


def test_a_required_data_key_is_named_with_an_example(tmp_path):
    proc = run("train.py", "data=webdataset", cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.py needs data.train_urls=...: " in one_line(proc.stderr)
    assert "data.train_urls='shards/" in proc.stderr


def test_an_override_syntax_error_is_one_line(tmp_path):
    proc = run("train.py", "first_stage.overrides=[trainer.max_steps=2]", cwd=tmp_path)
    assert proc.returncode == 2
    assert "override_grammar" in one_line(proc.stderr)


def test_optuna_search_without_the_plugin_names_the_extra(tmp_path):
    """The plugin is hidden by an empty `hydra_plugins.hydra_optuna_sweeper` earlier on the path (as if the
    `optuna` extra were not installed): Hydra then has no hydra/sweeper=optuna."""
    shadow = tmp_path / "shadow" / "hydra_plugins" / "hydra_optuna_sweeper"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    work = tmp_path / "work"
    work.mkdir()
    path = os.pathsep.join([str(tmp_path / "shadow"), str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = run("train.py", "-m", "hparams_search=ldm_optuna", "experiment=ldm_f8_text", cwd=work,
               env={"PYTHONPATH": path})
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "hydra/sweeper=optuna (chosen by hparams_search=ldm_optuna) needs the Optuna sweeper" in line
    assert "pip install -e '.[optuna]'" in line
    assert list(work.iterdir()) == []


def experiment_lines() -> list[str]:
    """`name  description`: the first comment line of each experiment file that is not `@package`."""
    lines = []
    for path in EXPERIMENTS:
        comments = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
        description = next(text for text in comments if text and not text.startswith("@package"))
        lines.append(f"{path.stem}  {description.rstrip(':')}")
    return lines


@pytest.mark.parametrize("args", [("--help",), ("list",)])
def test_help_and_list_show_each_experiment_with_its_description(tmp_path, args):
    proc = run("train.py", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    shown = [re.sub(r"\s{2,}", "  ", line.strip()) for line in proc.stdout.splitlines()]
    positions = [shown.index(expected) for expected in experiment_lines()]
    assert positions == sorted(positions) and len(positions) == len(EXPERIMENTS) >= 9
    if args == ("--help",):  # the experiments come before the config groups
        assert max(positions) < shown.index("== Configuration groups (GROUP=OPTION) ==")
        assert any(line.startswith("trainer: cpu, ddp") for line in shown)
    assert list(tmp_path.iterdir()) == []


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_the_cost_estimate_counts_the_networks_it_would_train():
    """The meta-device build has the parameters of the real one (size=tiny, built for real here)."""
    cfg = compose_train(["experiment=ldm_f8_text", "size=tiny", "model.first_stage_ckpt=unused.ckpt"])
    cost = estimate_cost(cfg)
    unet = UNetModel(**{**cfg.model.unet, "in_channels": 4, "out_channels": 4})  # derived: ae_kl_f8's 4 latent channels
    text = TextTransformer(**{k: v for k, v in cfg.model.conditioner.items() if k != "_target_"})
    assert cost.parameters == {"UNet": sum(p.numel() for p in unet.parameters()),
                               "conditioner": sum(p.numel() for p in text.parameters())}
    assert cost.flops_per_step > 0 and cost.cpu_flops_per_second > 0
    assert cpu_cost_warning(cfg) is None  # only size=paper warns
    assert cpu_cost_warning(compose_train(["experiment=ldm_f8_text", "trainer=gpu"])) is None


@pytest.mark.slow
def test_paper_size_on_cpu_warns_with_the_cost_and_suggests_size_small(tmp_path):
    """Real script, no GPU visible; the run then stops at the (deliberately) missing stage-1 file."""
    missing = tmp_path / "ae.ckpt"
    proc = run("train.py", "experiment=ldm_f8_text", f"model.first_stage_ckpt={missing}", f"paths.root_dir={tmp_path}",
               cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    warning = next((line for line in proc.stdout.splitlines() if "[WARNING]" in line), "")
    assert re.search(r"experiment=ldm_f8_text at size=paper on the CPU: [\d,]+M trained parameters \(UNet [\d,]+M, "
                     r"conditioner [\d,]+M\), [\d.,]+ TFLOP per training step of 32 images at 64 px: at least "
                     r"[\d,]+ s per step", warning), proc.stdout[-3000:]
    assert "for trainer.max_steps=1000" in warning and "use size=small" in warning
    assert proc.returncode != 0 and "does not exist" in proc.stderr  # the run went on after the warning

