"""Shared pytest setup: import the repo's modules from any working directory, one CPU thread.

The models under test are tiny, so one thread is faster than several (no synchronisation) and
leaves the machine's other cores alone.
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
