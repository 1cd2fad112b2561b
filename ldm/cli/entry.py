"""`hydra_entry`: what every ldm main is wrapped in (train.py, sample.py, evaluate.py, `python -m ldm.cli.export`,
`python -m ldm.cli.encode_latents`), so they answer the command line alike:

1. library noise is silenced by exact message (ldm/cli/noise.py);
2. command-line mistakes and unset required keys are one line and exit status 2, before Hydra creates a run
   directory (ldm/cli/errors.py);
3. Hydra runs the task; the errors a main declares as the user's (a missing file, a bad value: they carry a
   sentence saying what to change) are logged as that sentence and exit with status 2, not as a traceback.
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from ldm.cli.errors import CONFIG_DIR, USAGE_EXIT_STATUS, report_usage_errors
from ldm.cli.noise import quiet_library_noise

Task = Callable[[DictConfig], Any]


def hydra_entry(config_name: str, script: str,
                user_errors: tuple[type[BaseException], ...] = ()) -> Callable[[Task], Callable[[], Any]]:
    """Decorate a task `f(cfg)` into a main reading `sys.argv` (as `@hydra.main` does); `script` is how the
    user calls it (`sample.py`, `python -m ldm.cli.export`), for the messages."""

    def decorate(task: Task) -> Callable[[], Any]:
        log = logging.getLogger(config_name)

        @functools.wraps(task)
        def run(cfg: DictConfig) -> Any:
            try:
                return task(cfg)
            except user_errors as error:
                log.error("%s", error)
                sys.exit(USAGE_EXIT_STATUS)

        hydra_main = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)(run)

        @functools.wraps(task)
        def main() -> Any:
            quiet_library_noise()
            report_usage_errors(config_name, sys.argv[1:], script)
            return hydra_main()

        return main

    return decorate
