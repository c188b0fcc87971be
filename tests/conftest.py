import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The suite runs on small CPU machines and starts subprocesses (train.py, torchrun with 2 ranks): one thread per
# process avoids oversubscription, which made tiny forwards ~100× slower when processes competed for 2 cores.
os.environ.setdefault('OMP_NUM_THREADS', '1')
torch.set_num_threads(1)


@pytest.fixture
def repo_root():
    return ROOT
