"""Robustness sweep over the number of sampling steps (PFGM++ paper §4b, NFE = 2·steps − 1). One folder
`ckpt_{kimg:06d}_steps_{n}` per checkpoint and step count; --steps is ignored.

    python generate_steps.py --outdir=training-runs/exp_name --seeds=0-49999 --step_list=10,12,14,16,18,20,22,24
"""

import click

from training.generation import common_options, int_list, run


@click.command()
@common_options
@click.option('--step_list', metavar='LIST', default='10,12,14,16,18,20,22,24', show_default=True,
              callback=int_list(2), help='Step counts to sweep (each >= 2)')
def main(step_list, **opts):
    """Sample every checkpoint once per step count."""
    run(opts, axis='steps', values=step_list)


if __name__ == '__main__':
    main()
