"""What `python train.py --help` and `python train.py list` show first: every experiment with its one-line
description, which is the first comment line of `configs/experiment/<name>.yaml` (after `@package`).

The help template (configs/hydra/default.yaml, `hydra.help.template`) calls the `ldm.experiments` resolver
registered here, so the list is read from the files and never kept twice.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

EXPERIMENT_DIR = Path(__file__).resolve().parents[1] / "configs" / "experiment"
RESOLVER = "ldm.experiments"


def experiment_descriptions(directory: Path = EXPERIMENT_DIR) -> dict[str, str]:
    """`{name: first comment line}` of every experiment config, sorted by name."""
    return {path.stem: first_comment_line(path) for path in sorted(directory.glob("*.yaml"))}


def first_comment_line(path: Path) -> str:
    """The first `# ...` line that is not a `# @package` directive, without the `#`; "" if there is none."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text.startswith("#"):
            if text:
                break  # the comment block is over
            continue
        text = text.lstrip("#").strip()
        if text and not text.startswith("@package"):
            return text.rstrip(":").rstrip()
    return ""


def format_experiments(directory: Path = EXPERIMENT_DIR) -> str:
    """One line per experiment: its name, padded, then its description."""
    descriptions = experiment_descriptions(directory)
    width = max(map(len, descriptions), default=0)
    return "\n".join(f"  {name:<{width}}  {text}" for name, text in descriptions.items())


def print_experiments(config_dir: Path) -> None:
    """`python train.py list`."""
    print("Experiments (python train.py experiment=NAME [KEY=VALUE ...]; default: quickstart):")
    print(format_experiments(config_dir / "experiment"))


OmegaConf.register_new_resolver(RESOLVER, lambda: format_experiments(), replace=True)
