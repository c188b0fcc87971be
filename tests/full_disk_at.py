"""Run train.py's command line in this process, with rank 0's writes of files whose path contains NAME failing
with ENOSPC after a few kB (a full disk as rank 0 alone sees it).

Usage: full_disk_at.py NAME TRAIN_ARGS...   (under python or torchrun)
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train  # noqa: E402
from test_resilience import _failing_fdopen  # noqa: E402


class _Patch:
    """The one monkeypatch method _failing_fdopen uses, for a process that ends when the run does."""
    setattr = staticmethod(setattr)


if __name__ == '__main__':
    if os.environ.get('RANK', '0') == '0':
        _failing_fdopen(_Patch, sys.argv[1], after_bytes=4096)
    train.main(sys.argv[2:])
