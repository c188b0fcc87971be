"""Run train.py's command line in this process and save this rank's final net and EMA weights.

Usage (under torchrun): ddp_capture.py OUT_PREFIX TRAIN_ARGS...; writes OUT_PREFIX-rank{rank}.pt holding
{'net': state_dict, 'ema': state_dict} (and 'phema' tracks when on). Lets a test compare the weights every process ended with instead of
trusting the program's own consistency check.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import train  # noqa: E402
from training import training_loop  # noqa: E402


def main():
    out_prefix, train_args = sys.argv[1], sys.argv[2:]
    run = training_loop.training_loop

    def run_and_save(**kwargs):
        result = run(**kwargs)
        weights = {name: {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                   for name, module in (('net', result.net), ('ema', result.ema))}
        if result.phema is not None:  # the post-hoc EMA tracks, {'0.05': {name: tensor}, ...}
            weights['phema'] = {f'{std:g}': {k: v.detach().cpu().clone() for k, v in track.items()}
                                for std, track in zip(result.phema.stds, result.phema.state_dict()['tracks'])}
        torch.save(weights, f'{out_prefix}-rank{int(os.environ.get("RANK", 0))}.pt')
        return result

    training_loop.training_loop = run_and_save
    train.main.main(args=train_args, prog_name='train.py')


if __name__ == '__main__':
    main()
