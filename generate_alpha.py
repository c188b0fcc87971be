"""Robustness sweep over noise injection α (PFGM++ paper §4a): before every sampling step i, α·σ_i·N(0, I) is
added to x. One folder `ckpt_{kimg:06d}_alpha_{α}` per checkpoint and α.

    python generate_alpha.py --outdir=training-runs/exp_name --seeds=0-49999 --alpha_list=0,0.1,0.2
"""

import click

from generate import common_options, float_list, run_script


@click.command()
@common_options
@click.option('--alpha_list', metavar='LIST', default='0,0.1,0.2', show_default=True, callback=float_list,
              help='Noise-injection strengths α to sweep')
def main(alpha_list, **opts):
    """Sample every checkpoint once per α."""
    if min(alpha_list) < 0:
        raise click.BadParameter(f'α must be >= 0, got {min(alpha_list):g}', param_hint='--alpha_list')
    run_script(opts, axis='alpha', values=alpha_list)


if __name__ == '__main__':
    main()
