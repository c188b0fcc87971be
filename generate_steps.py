"""Sweep over the number of sampling steps (PFGM++ paper §4b), or over NFE for any --solver. One folder
`ckpt_{kimg:06d}_steps_{n}` per checkpoint and step count for heun (NFE = 2·steps − 1), and
`ckpt_{kimg:06d}_{solver}_end-…_grid-…_lof-…_afs-…_steps_{n}` for the other solvers (NFE = steps − 1 with
--ending=stop, steps with denoise, one fewer with --afs); --steps and --nfe are ignored.

    python generate_steps.py --outdir=training-runs/exp_name --seeds=0-49999 --step_list=10,12,14,16,18,20,22,24
    python generate_steps.py --outdir=training-runs/exp_name --seeds=0-49999 --solver=dpm3m --nfe_list=5,7,9,11,15
"""

import click

from generate import common_options, given_on_command_line, int_list, run_script, steps_for_nfe


@click.command()
@common_options
@click.option('--step_list', metavar='LIST', default='10,12,14,16,18,20,22,24', show_default=True,
              callback=int_list(2), help='Step counts to sweep (each >= 2)')
@click.option('--nfe_list', metavar='LIST', default=None, callback=int_list(1, optional=True),
              help='NFEs to sweep instead of --step_list, each turned into the step count of --solver (heun: odd '
                   'NFE >= 3 only; the others: see --steps)')
def main(step_list, nfe_list, **opts):
    """Sample every checkpoint once per step count (or NFE)."""
    if nfe_list is not None:
        if given_on_command_line('step_list'):
            raise click.BadParameter('give --step_list or --nfe_list, not both', param_hint='--nfe_list')
        step_list = [steps_for_nfe(opts, nfe, '--nfe_list') for nfe in nfe_list]
    run_script(opts, axis='steps', values=step_list)


if __name__ == '__main__':
    main()
