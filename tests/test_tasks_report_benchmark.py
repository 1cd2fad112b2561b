"""benchmarks/tasks_report.py's composition of each task's training (the training and evaluation themselves are
train.py's and evaluate.py's, tested there): the run from a text-to-image checkpoint and its from-scratch arm."""
from argparse import Namespace

import pytest

from benchmarks.tasks_report import TASKS, init_overrides


def test_inpainting_from_a_quickstart_run_loads_it_and_keeps_its_autoencoder():
    args = Namespace(init_from="qs/step3000.ckpt", init_first_stage="ae/last.ckpt")
    assert init_overrides("inpaint_quickstart", args) == ["model.first_stage_ckpt=ae/last.ckpt",
                                                         "init_from=qs/step3000.ckpt"]
    scratch = Namespace(init_from="none", init_first_stage="ae/last.ckpt")  # the ablation's other arm
    assert init_overrides("inpaint_quickstart", scratch) == ["model.first_stage_ckpt=ae/last.ckpt"]
    assert init_overrides("inpaint_f4", args) == []  # the other tasks train their own stage 1 from scratch
    assert TASKS["inpaint_quickstart"] == ("quickstart_inpaint", "inpaint")


def test_inpainting_from_a_quickstart_run_without_its_checkpoint_names_both_flags():
    with pytest.raises(SystemExit, match="--init-from.*--init-first-stage"):
        init_overrides("inpaint_quickstart", Namespace(init_from=None, init_first_stage=None))
