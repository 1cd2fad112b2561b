"""Test-wide settings: offline hubs, offline wandb, one thread per process (2-core CI)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIXTURES_DIR = os.path.join(REPO_ROOT, "tests", "fixtures")


@pytest.fixture(scope="session")
def fixtures_dir() -> str:
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT
