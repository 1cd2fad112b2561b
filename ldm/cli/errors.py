"""Command-line answers shared by every Hydra main: a mistake on the command line is one line on stderr
and exit status 2, before anything runs or is created.

`check_command_line` composes the config exactly as Hydra will (same directory, same overrides) and turns
what Hydra would report as a traceback, or as advice that fails differently (`+data.batchsize=8` adds a key
nothing reads), into a sentence that names the key and what to type instead:

- a key that does not exist -> the nearest existing keys (difflib), e.g. `data.batch_size=8`;
- a config-group option that does not exist -> the nearest options (`experiment=ldm_f8_text`);
- a required value left at `???` (`sample.py` without `ckpt`) -> the key and an example command;
- a config that needs a Hydra plugin that is not installed (the Optuna sweeper) -> the extra to install.

It imports only Hydra and OmegaConf, so the root scripts run it before torch loads (`exit_on_usage_error`):
a mistake is answered in about a second, and `--help`, `--cfg` and `list` never wait for the models either.
"""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import (
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig, ListConfig

from ldm.cli.help import print_experiments

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
USAGE_EXIT_STATUS = 2  # as argparse: the command line was wrong, nothing ran
MULTIRUN_FLAGS = ("-m", "--multirun")
# Hydra flags after which Hydra prints something and does not run the task (so no models are needed).
NO_TASK_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")
# Config-group options that Hydra plugins register, and the pip extra that installs each plugin.
PLUGIN_OPTIONS = {
    "hydra/sweeper/optuna": "the Optuna sweeper (hydra-optuna-sweeper): pip install -e '.[optuna]' "
                            "(make install installs it with the dev extra)",
    "hydra/launcher/submitit_local": "the submitit launcher (hydra-submitit-launcher): pip install -e .",
    "hydra/launcher/submitit_slurm": "the submitit launcher (hydra-submitit-launcher): pip install -e .",
}
# An example command for each required (`???`) key, shown when it is left unset.
EXAMPLES = {
    "sample": {"ckpt": 'python sample.py ckpt=outputs/quickstart/runs/<date>_<time>/checkpoints/last.ckpt '
                       'prompt="a red circle at the top left"'},
    "train": {"data.train_urls": "python train.py data=webdataset data.train_urls='shards/train-{000000..000009}.tar' "
                                 "data.val_urls='shards/val-000000.tar'",
              "data.root": "python train.py data=latents data.root=latents/f8_256 model.first_stage_ckpt=PATH"},
    "export": {"ckpt": "python -m ldm.cli.export ckpt=outputs/ldm_f8_text/runs/<date>/checkpoints/last.ckpt "
                       "format=diffusers out=export/diffusers",
               "out": "python -m ldm.cli.export ckpt=PATH format=safetensors out=model.safetensors"},
    "encode_latents": {"first_stage_ckpt": "python -m ldm.cli.encode_latents first_stage_ckpt=outputs/ae_kl_f8/runs/"
                                           "<date>/checkpoints/last.ckpt out=latents/f8_256",
                       "out": "python -m ldm.cli.encode_latents first_stage_ckpt=PATH out=latents/f8_256"},
}
_CHECKED: set[tuple[str, tuple[str, ...]]] = set()  # command lines already checked in this process


class UsageError(Exception):
    """A command-line mistake; the message is one line for the user."""


def exit_on_usage_error(config_name: str, argv: Sequence[str], script: str) -> None:
    """The root scripts' first step: answer `list`, Hydra's no-task flags (`--help`, `--cfg`, ...) and
    command-line mistakes without importing the models; return only when the task should run."""
    argv = list(argv)
    if config_name == "train" and argv == ["list"]:
        print_experiments(CONFIG_DIR)
        sys.exit(0)
    if any(arg.split("=")[0] in NO_TASK_FLAGS for arg in argv):
        task = _no_task_named(Path(script).stem)
        hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)(task)()
        sys.exit(0)
    report_usage_errors(config_name, argv, script)


def report_usage_errors(config_name: str, argv: Sequence[str], script: str) -> None:
    """`check_command_line`, printing its one line and exiting with status 2 on a mistake (once per
    command line: the root scripts check before the heavy imports, the main again finds it done)."""
    if (config_name, tuple(argv)) in _CHECKED:
        return
    try:
        check_command_line(config_name, argv, script)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_EXIT_STATUS)
    _CHECKED.add((config_name, tuple(argv)))


def check_command_line(config_name: str, argv: Sequence[str], script: str) -> None:
    """Raise `UsageError` if Hydra would refuse `argv`, or if a required (`???`) value is left unset.

    A command with flags other than `-m` is left to Hydra, and so is what cannot be checked without running
    (glob and interval sweeps), so it never refuses a command Hydra accepts. A multirun sweep is checked value
    by value (`experiment=a,b`: both)."""
    if any(arg.startswith("-") and arg not in MULTIRUN_FLAGS for arg in argv):
        return
    overrides = [arg for arg in argv if arg not in MULTIRUN_FLAGS]
    try:
        jobs = sweep_variants(overrides)
        sweeps = [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]
    except OverrideParseException as error:
        raise UsageError(first_line(error)) from None  # Hydra's message links the override grammar
    cfg = compose_or_explain(config_name, jobs[0], script)
    for job in jobs[1:]:
        compose_or_explain(config_name, job, script)
    multirun = len(overrides) < len(argv) or str(cfg.hydra.get("mode")) == "RunMode.MULTIRUN"
    if sweeps and not multirun:
        raise UsageError(f"{sweeps[0]} is a sweep: add -m to run one job per value (python {script} -m ...).")
    missing = missing_keys(cfg)
    if missing:
        key = missing[0]
        example = EXAMPLES.get(config_name, {}).get(key, f"python {script} {key}=VALUE")
        raise UsageError(f"{script} needs {key}=...: {describe_missing(key, missing)}e.g. {example}")


def sweep_variants(args: Sequence[str], limit: int = 16) -> list[list[str]]:
    """Override lists of single jobs: every sweep at its first value, then each further value of each sweep
    (the others at their first), at most `limit` lists. Glob and interval sweeps are left to Hydra."""
    parsed = OverridesParser.create().parse_overrides(list(args))
    values: list[list[str]] = []
    for override in parsed:
        if not override.is_sweep_override():
            values.append([override.input_line])
            continue
        try:
            values.append([f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()])
        except Exception:  # noqa: BLE001 - no values to enumerate here
            values.append([])
    base = [options[0] for options in values if options]
    jobs = [base]
    for index, options in enumerate(values):
        for option in options[1:]:
            jobs.append([option if i == index else other[0] for i, other in enumerate(values) if other])
    return jobs[:limit]


def compose_or_explain(config_name: str, overrides: list[str], script: str) -> DictConfig:
    """The composed config (with `hydra`), or `UsageError` saying what in `overrides` is wrong."""
    try:
        return compose_config(config_name, overrides)
    except MissingConfigException as error:
        raise UsageError(explain_missing_config(error, overrides, script)) from None
    except ConfigCompositionException as error:
        raise UsageError(explain_composition_error(error, config_name, overrides, script)) from None


def explain_composition_error(error: ConfigCompositionException, config_name: str, overrides: list[str],
                              script: str) -> str:
    message = str(error)
    present = re.search(r"An item is already at '([^']+)'", message)
    if present:
        return (f"{present.group(1)} exists already: set it without the leading + ({present.group(1)}=...); "
                "+ adds a key that is not in the config.")
    bad = re.match(r"Could not override '([^']+)'", message)
    if not bad:
        return first_line(error)
    key = bad.group(1)
    parser = OverridesParser.create()
    mine = [o for o in overrides if parser.parse_override(o).key_or_group == key]
    rest = [o for o in overrides if o not in mine]
    known = None
    while known is None:
        try:
            known = compose_config(config_name, rest)
        except MissingConfigException:
            return first_line(error)
        except ConfigCompositionException as other:  # another unknown key: drop it too, name the first
            again = re.match(r"Could not override '([^']+)'", str(other))
            fewer = [o for o in rest if not again or parser.parse_override(o).key_or_group != again.group(1)]
            if len(fewer) == len(rest):
                return first_line(error)
            rest = fewer
    candidates = known_keys(known, with_hydra=key.startswith("hydra"))
    if key in candidates:  # the key exists: the value is what Hydra refused
        return first_line(error)
    value = mine[0].split("=", 1)[1] if mine and "=" in mine[0] else "..."
    return explain_unknown_key(key, value, candidates, script)


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def explain_unknown_key(key: str, value: str, candidates: list[str], script: str) -> str:
    nearest = nearest_keys(key, candidates)
    if nearest:
        hint = " or ".join(f"{name}={value}" for name in nearest)
        return f"{script} has no key {key}; did you mean {hint}?"
    parent = key.rpartition(".")[0]
    siblings = sorted(name.rpartition(".")[2] for name in candidates if name.rpartition(".")[0] == parent)
    where = f"{parent} has: {', '.join(siblings)}" if siblings else f"`python {script} --cfg job` lists every key"
    return f"{script} has no key {key} ({where})."


def nearest_keys(key: str, candidates: Iterable[str], n: int = 2) -> list[str]:
    """The closest existing keys by difflib's ratio, on the whole dotted key or else on its last part."""
    candidates = sorted(set(candidates))
    nearest = difflib.get_close_matches(key, candidates, n=n, cutoff=0.75)
    if nearest:
        return nearest
    leaf = key.rpartition(".")[2]
    by_leaf: dict[str, list[str]] = {}
    for name in candidates:
        by_leaf.setdefault(name.rpartition(".")[2], []).append(name)
    leaves = difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.75)
    return [name for found in leaves for name in by_leaf[found]][:n]


def known_keys(cfg: DictConfig, with_hydra: bool) -> list[str]:
    """Every dotted key of the config, and every config group (`experiment`, `model/conditioner`)."""
    keys = []

    def walk(node: DictConfig, prefix: str) -> None:
        for name in node.keys():
            path = f"{prefix}{name}"
            if not with_hydra and path == "hydra":
                continue
            keys.append(path)
            child = node._get_node(name)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                walk(child, f"{path}.")

    walk(cfg, "")
    groups = [group for group in cfg.hydra.runtime.choices if with_hydra or not group.startswith("hydra/")]
    return keys + groups


def missing_keys(cfg: DictConfig) -> list[str]:
    """The dotted keys whose value is `???`, outside `hydra` (its runtime fields are filled in later).
    Nothing is resolved: interpolations such as `${hydra:runtime.output_dir}` only exist in a running job."""
    found = []

    def walk(node: Any, prefix: str) -> None:
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
        for name, _ in list(items):
            child = node._get_node(name)
            path = f"{prefix}{name}"
            if path == "hydra":
                continue
            if child._is_missing():
                found.append(path)
            elif isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_interpolation():
                walk(child, f"{path}.")

    walk(cfg, "")
    return found


def describe_missing(key: str, missing: list[str]) -> str:
    others = [other for other in missing if other != key]
    return f"it has no default (also unset: {', '.join(others)}); " if others else "it has no default; "


def explain_missing_config(error: MissingConfigException, overrides: list[str], script: str) -> str:
    """A config-group option that does not exist: a plugin to install, or the nearest options."""
    wanted = error.missing_cfg_file or ""
    group, _, option = wanted.rpartition("/")
    if wanted in PLUGIN_OPTIONS:
        searches = [o.lstrip("+") for o in overrides if o.lstrip("+").startswith("hparams_search=")]
        asked = f" (chosen by {', '.join(searches)})" if searches else ""
        return f"{group}={option}{asked} needs {PLUGIN_OPTIONS[wanted]}; it is not installed."
    options = list(error.options or [])
    if group and options:
        nearest = difflib.get_close_matches(option, options, n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(f'{group}={o}' for o in nearest)}? " if nearest else ""
        return f"{script}: {group}={option} does not exist; {hint}(options: {', '.join(sorted(options))})"
    return first_line(error)


def first_line(error: Exception) -> str:
    """Hydra's message and its cause, without OmegaConf's location lines (`full_key:`, ...), on one line."""
    text = f"{error}\n{error.__cause__}" if error.__cause__ is not None else str(error)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
    return " ".join(kept[:2])


def _no_task_named(job_name: str):
    """A task for Hydra's `--help`, `--cfg`, `--info` (which print and never call it), named as the real
    main's module so that `hydra.job.name` is the same (Hydra takes it from the task's module)."""

    def task(cfg: DictConfig) -> None:
        raise AssertionError("Hydra runs no task for --help, --cfg, --info")

    task.__module__ = f"ldm.cli.{job_name}"
    return task
