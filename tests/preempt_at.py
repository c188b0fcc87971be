"""Run train.py's command line in this process and send a stop signal while step STEP runs.

Usage: preempt_at.py SIGNAL STEP TARGET STAMP TRAIN_ARGS...   (under python or torchrun)
  SIGNAL  TERM or USR1
  TARGET  job:   rank 0 signals every process of the job at once, as SLURM does: its parent when that is the
                 torchrun agent, and every descendant of it (training processes, DataLoader workers)
          agent: rank 0 signals the torchrun agent alone (which forwards it)
  STAMP   rank 0 writes the time the signal went out there (for the test's exit-time bound)
The signal goes out before the step's work, so it arrives while the step runs; rank 0 sends it to itself once
more as it starts writing the preemption state (a second signal during the save must change nothing).
"""

import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psutil  # noqa: E402

import train  # noqa: E402
from training import checkpoint, training_loop  # noqa: E402


def targets(which):
    me = psutil.Process()
    under_torchrun = 'TORCHELASTIC_RUN_ID' in os.environ
    if which == 'agent':
        return [me.parent()]
    root = me.parent() if under_torchrun else me
    return [root] + root.children(recursive=True)


def main():
    signame, step, which, stamp, train_args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
    signum = getattr(signal, 'SIG' + signame)
    real_step = training_loop.training_step
    count = [0]

    def step_and_signal(*args, **kwargs):
        count[0] += 1
        if count[0] == step and int(os.environ.get('RANK', 0)) == 0:
            with open(stamp, 'w') as f:
                f.write(repr(time.time()))
            for process in targets(which):
                os.kill(process.pid, signum)
        return real_step(*args, **kwargs)

    real_save = checkpoint.save_training_state

    def signal_again_and_save(path, **kwargs):
        if checkpoint.is_preempted_state(path):
            os.kill(os.getpid(), signum)
        return real_save(path, **kwargs)

    training_loop.training_step = step_and_signal
    checkpoint.save_training_state = signal_again_and_save
    train.main.main(args=train_args, prog_name='train.py')


if __name__ == '__main__':
    main()
