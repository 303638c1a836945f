"""Shared pytest setup: import the repo's modules from any working directory, one CPU thread, idle OpenMP
threads that sleep, and the background jobs (background.py), started when collection ends and stopped when
the session does.

The models under test are tiny, so one thread is faster than several (no synchronisation) and leaves the
machine's other core to the background jobs. The few tests that take two threads wait for their turn asleep,
as train.py's do, instead of spinning against a background job.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as train.py does

import torch  # noqa: E402

import background  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    background.reorder(items)


def pytest_collection_finish(session):
    if not session.config.option.collectonly:
        background.start(session.items)


def pytest_sessionfinish(session):
    background.stop()
