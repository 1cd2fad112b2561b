"""Every command of the README runs as printed: each fenced ```bash command of our entry points is split as a
shell splits it, its overrides parse with Hydra's override parser and compose against the config tree
(placeholders such as PATH, DIR or <date> stand for the user's values), and the data commands run for real
on a tiny shard set, through bash (so the shell's quoting is what is tested)."""
from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "ldm" / "configs"
README = (REPO / "README.md").read_text()
# entry point -> Hydra config name (ldm.cli.report takes argparse arguments: only split, not parsed)
HYDRA_ENTRY_POINTS = {"train.py": "train", "sample.py": "sample", "evaluate.py": "evaluate",
                      "ldm.cli.export": "export", "ldm.cli.encode_latents": "encode_latents"}
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
PLACEHOLDER = re.compile(r"<([a-z_]+)>")  # <date>, <time>: the user's run directory names


def readme_commands() -> list[str]:
    """The commands of the README's ```bash blocks, continuation lines joined, comments kept (shlex drops them)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if shlex.split(line, comments=True):
                commands.append(line.strip())
    return commands


def entry_point(command: str) -> tuple[str, list[str]] | None:
    """(entry point, its arguments) of a `python <script>` / `python -m <module>` command, else None."""
    tokens = shlex.split(PLACEHOLDER.sub(lambda m: m.group(1).upper(), command), comments=True)
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens.pop(0)
    if len(tokens) < 2 or tokens[0] != "python":
        return None
    if tokens[1] == "-m":
        return tokens[2], tokens[3:]
    return tokens[1], tokens[2:]


HYDRA_COMMANDS = [c for c in readme_commands() if (e := entry_point(c)) and e[0] in HYDRA_ENTRY_POINTS]


def test_the_readme_has_commands_of_every_entry_point():
    assert {entry_point(c)[0] for c in HYDRA_COMMANDS} == set(HYDRA_ENTRY_POINTS)
    assert len(HYDRA_COMMANDS) >= 30


def first_of_each_sweep(overrides: list) -> list[str]:
    """A multirun's overrides with each sweep (`a,b`) replaced by its first value: one job to compose."""
    job = []
    for override in overrides:
        value = next(iter(override.sweep_string_iterator())) if override.is_sweep_override() else None
        job.append(f"{override.get_key_element()}={value}" if value is not None else override.input_line)
    return job


@pytest.mark.parametrize("command", HYDRA_COMMANDS, ids=[" ".join(c.split()[1:4])[:70] for c in HYDRA_COMMANDS])
def test_readme_command_parses_and_composes_as_the_shell_passes_it(command):
    script, args = entry_point(command)
    if args in (["list"], ["--help"]):  # train.py's own listing, not overrides: run it
        listing = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                                 timeout=300, cwd=REPO)
        assert listing.returncode == 0, listing.stderr[-2000:]
        assert all(p.stem in listing.stdout for p in (CONFIGS / "experiment").glob("*.yaml"))
        return
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    parsed = OverridesParser.create().parse_overrides(overrides)  # what Hydra does first, with shell-split args
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=HYDRA_ENTRY_POINTS[script], overrides=first_of_each_sweep(parsed),
                      return_hydra_config=True)
    for override in parsed:  # every value the user typed arrives where it was aimed
        key = override.get_key_element().lstrip("+~")
        is_group = (CONFIGS / key).is_dir()  # experiment=, size=, data=, hydra/launcher=: a config choice
        if not is_group and not override.is_sweep_override() and not key.startswith("hydra."):
            assert str(_select(cfg, key)) == str(override.value()), key


def _select(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


# ----------------------------------------------------------------------------- the data commands, for real
def readme_block(heading: str) -> list[str]:
    """The commands of the first ```bash block after a README heading."""
    section = README.split(f"## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def write_tiny_shards(directory: Path) -> None:
    """`train-000000..000009.tar` and `val-000000.tar`: 2 captioned 40x36 images each."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"train-{i:06d}" for i in range(10)] + ["val-000000"]:
        with tarfile.open(directory / f"{name}.tar", "w") as tar:
            for j in range(2):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
                for ext, data in (("png", buffer.getvalue()), ("txt", b"a photo")):
                    info = tarfile.TarInfo(f"{name}_{j}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def run_in_bash(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command as a user would paste it into bash, with `python` this interpreter (and the repo importable)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1",
               LDM_HOME=str(cwd / "ldm_home"))
    line = re.sub(r"^python ", f"{shlex.quote(sys.executable)} ", command)
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def shards_here(tmp_path) -> Path:
    """A working directory like the README's: shards/ beside links to train.py and data/."""
    write_tiny_shards(tmp_path / "shards")
    for name in ("train.py", "data"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


@pytest.mark.slow
def test_your_own_data_commands_run_as_printed(shards_here):
    make_shards, inspect, train = readme_block("Your own data")
    assert make_shards.startswith("python data/make_shards.py")  # needs an image folder: DIR is the user's
    inspected = run_in_bash(inspect, shards_here)
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    assert "shards: 10" in inspected.stdout and "samples: 20 (0 corrupt" in inspected.stdout
    # the printed training command, cut to one tiny step by overrides appended after it
    tiny = ("size=tiny data.resolution=32 data.batch_size=2 data.num_workers=0 trainer.max_steps=1 "
            "trainer.val_check_interval=1 trainer.limit_val_batches=1 trainer.precision=32-true "
            "model.loss.perceptual_weight=0 logger=csv")
    trained = run_in_bash(f"{train.split('#')[0].strip()} {tiny}", shards_here)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    assert list(shards_here.glob("ldm_home/outputs/ae_kl_f8/runs/*/checkpoints/last.ckpt"))


@pytest.mark.slow
def test_digits_walkthrough_runs_as_printed(tmp_path):
    """README "A small class-labelled set": the shards command (fewer images, appended flags win) and the training
    command as printed, cut to one step per stage; num_classes, grid classes and UNet depth come from the data."""
    make_digits, train = readme_block("A small class-labelled set (digits: classes 0–9, 32 px, f = 4)")
    for name in ("train.py", "data"):
        (tmp_path / name).symlink_to(REPO / name)
    made = run_in_bash(f"{make_digits.split('#')[0].strip()} --num-train 16 --num-val 4 --samples-per-shard 8",
                       tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    tiny = ("size=tiny data.batch_size=4 data.num_workers=0 trainer.max_steps=1 trainer.val_check_interval=1 "
            "trainer.limit_val_batches=1 sampling.steps=2 callbacks.sample_grid.samples_per_condition=1 "
            "\"first_stage.overrides=['trainer.max_steps=1','trainer.val_check_interval=1','data.batch_size=4',"
            "'model.loss.perceptual_weight=0']\" after_training={}")
    trained = run_in_bash(f"{train} {tiny}", tmp_path)
    log = trained.stdout + trained.stderr
    assert trained.returncode == 0, log[-3000:]
    assert "num_classes = 10, from digits/classes.json" in log
    assert "using channel_mult=[1, 2], attention_resolutions=[2]" in log
    assert "callbacks.sample_grid.classes = [0, 3, 6, 9]" in log
    assert list(tmp_path.glob("ldm_home/outputs/ldm_f4_class/runs/*/images/samples_step0000001.png"))
