"""Stop a run cleanly when the cluster asks for it: SIGTERM (preemption, scancel, torchrun's shutdown) or SIGUSR1
(SLURM's `--signal=USR1@SECONDS` warning before the time limit).

Who receives the signal: SLURM signals every process of the job (each training process and its DataLoader
workers); torchrun forwards SIGTERM (and SIGUSR1 when started with `--signals-to-handle=...,SIGUSR1`) from its
agent to every training process. Either way the signal only sets a flag here. The training loop asks
`should_stop()` at each step boundary; with several processes they agree through one tiny all-reduce on the CPU
(gloo) every `agree_every` steps, so every rank stops on the same step and the step itself never waits for the
device. DataLoader workers ignore both signals (`ignore_in_worker`): their parent shuts them down.
"""

import multiprocessing.resource_tracker
import os
import signal
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# The exit status of a run stopped by a signal after saving: EX_TEMPFAIL from sysexits.h, "try again later".
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Raised by the training loop after it has saved its state because a stop signal arrived."""


class PreemptionGuard:
    """Record SIGTERM/SIGUSR1 while active (a context manager); `should_stop()` answers at step boundaries.

    agree_every: with several processes, steps between two agreements (every process must call should_stop()
    at the same steps). With one process the answer is immediate.
    """

    def __init__(self, agree_every=4):
        self.agree_every = int(agree_every)
        self.received = None  # the first stop signal this process got (a signal.Signals), or None
        self._calls = 0
        self._previous = {}
        self._group = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != 'gloo':
            self._group = dist.new_group(backend='gloo')  # a CPU collective: no device synchronisation
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        return False

    def _record(self, signum, _frame):
        # A second signal (e.g. during the save) changes nothing: the first decides, the save goes on.
        if self.received is None:
            self.received = signal.Signals(signum)

    def should_stop(self):
        """True on every process at the same step once any process has received a stop signal."""
        self._calls += 1
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received is not None
        if self._calls % self.agree_every != 0:
            return False
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def describe(self):
        """'SIGTERM' / 'SIGUSR1', or 'a stop signal to another process' on a rank that got none itself."""
        return self.received.name if self.received is not None else 'a stop signal to another process'


def ignore_in_worker(_worker_id=None):
    """DataLoader worker_init_fn: the stop signals are the training process's business, not the worker's."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def start_resource_tracker():
    """Start multiprocessing's resource tracker (spawned DataLoader workers use it) with SIGUSR1 ignored, which it
    inherits. SLURM signals every process of the job; the tracker ignores SIGINT and SIGTERM by itself, but SIGUSR1
    would kill it, and its replacement prints tracebacks about the resources it never saw."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        multiprocessing.resource_tracker.ensure_running()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def torchrun_usr1_note():
    """A one-line warning when this process runs under a torchrun agent that would die of SIGUSR1 instead of
    forwarding it; None otherwise."""
    handled = os.environ.get('TORCHELASTIC_SIGNALS_TO_HANDLE')
    if handled is None or 'SIGUSR1' in [name.strip() for name in handled.split(',')]:
        return None
    return ('Note: torchrun forwards SIGTERM only; start it with --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,'
            'SIGUSR1 if SIGUSR1 is sent to torchrun alone (SLURM --signal=B:USR1), or SIGUSR1 kills it.')
