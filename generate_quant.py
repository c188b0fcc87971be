"""Robustness sweep over post-training weight quantisation (PFGM++ paper §4c): per-tensor asymmetric min/max fake
quantisation of the weights to b bits, from the original weights for every b. One folder
`ckpt_{kimg:06d}_quant_{b}` per checkpoint and bit width. See training/quantize.py for which tensors are touched.

    python generate_quant.py --outdir=training-runs/exp_name --seeds=0-49999 --bits_list=5-9
"""

import click

from generate import common_options, int_list, run_script
from training.quantize import FILTERS


@click.command()
@common_options
@click.option('--bits_list', metavar='LIST', default='5,6,7,8,9', show_default=True, callback=int_list(1),
              help='Bit widths to sweep')
@click.option('--quant_filter', type=click.Choice(FILTERS), default='layers', show_default=True,
              help='layers: all conv/linear/attention weights outside the embedding network; reference: the '
                   'reference\'s name filter (skips names containing norm/affine/map/32)')
def main(bits_list, quant_filter, **opts):
    """Sample every checkpoint once per bit width."""
    run_script(opts, axis='quant', values=bits_list, quant_filter=quant_filter)


if __name__ == '__main__':
    main()
