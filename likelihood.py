"""Bits per dimension of a dataset under a trained EDM / PFGM++ network, through the probability-flow ODE.

    python likelihood.py --network=training-runs/00000-.../training-state-000060.pt --data=digits.zip \\
        --images=1500-1796 --outdir=out        # held-out images 1500..1796 → out/likelihood-000060.json
    torchrun --standalone --nproc_per_node=8 likelihood.py --outdir=training-runs/00000-... --data=...
                                               # every checkpoint of the run → likelihood-{kimg}.json in it

The ODE, the divergence and the priors live in training/likelihood.py; docs/likelihood.md says what the numbers
mean and what they cost.
"""

import click

from dnnlib.util import error_summary, parse_int_list
from torch_utils import distributed as dist
from training import likelihood


def _parse_images(ctx, param, value):
    if value is None:
        return None
    try:
        indices = parse_int_list(value)
    except ValueError:
        raise click.BadParameter(f'{value!r} is not a list like "1500-1796" or "0,5,9-12"') from None
    if not indices or min(indices) < 0:
        raise click.BadParameter(f'{value!r}: need a non-empty list of image indices >= 0')
    if len(set(indices)) != len(indices):
        raise click.BadParameter(f'{value!r} names an image twice')
    return indices


@click.command()
@click.option('--network', 'network_pkl', metavar='PATH', default=None,
              help='One network file (as generate.py reads). Without it, every training-state-*.pt in --outdir.')
@click.option('--outdir', metavar='DIR', required=True,
              help='Where likelihood-{kimg}.json goes; without --network, also the training run directory to read.')
@click.option('--data', metavar='ZIP|DIR', required=True, help='Dataset of 8-bit images (dataset_tool.py format)')
@click.option('--images', metavar='LIST', default=None, callback=_parse_images,
              help='Indices of the images to evaluate in the dataset\'s order, e.g. 1500-1796 for a held-out part '
                   '[default: all]')
@click.option('--seed', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True,
              help='Image i draws its dequantization noise and probe from seed + i')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True,
              help='Images per ODE solve (per process); they share the solver\'s steps, so a result depends on its '
                   'batch within the tolerance (--batch=1: on the image and its seed only)')
@click.option('--sigma_min', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.002,
              show_default=True, help='Noise level where the ODE starts from the data')
@click.option('--sigma_max', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=80,
              show_default=True, help='Noise level of the prior (Student-t with the network\'s D; Gaussian for EDM)')
@click.option('--rtol', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-5,
              show_default=True, help='Relative tolerance of the RK45 solver')
@click.option('--atol', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-5,
              show_default=True, help='Absolute tolerance of the RK45 solver')
@click.option('--variable', type=click.Choice(likelihood.VARIABLES), default='sigma', show_default=True,
              help='Integrate in sigma or in log(sigma) (docs/likelihood.md compares them)')
@click.option('--exact-trace', 'exact_trace', is_flag=True,
              help='Exact divergence (the network runs on N copies of each image per step: small images only) '
                   'instead of Hutchinson\'s estimate with one Rademacher probe per image')
@click.option('--ckpt', metavar='KIMG', type=int, default=0, show_default=True,
              help='Run-directory mode: first checkpoint (kimg) to use')
@click.option('--end_ckpt', metavar='KIMG', type=int, default=100000000, show_default=True,
              help='Run-directory mode: last checkpoint (kimg) to use')
def main(**opts):
    """Bits/dim of dataset images under one --network file or every checkpoint of the run directory --outdir."""
    device = dist.init()
    try:
        likelihood.run(opts, device)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(error_summary(err)) from None
    finally:
        dist.shutdown()


if __name__ == '__main__':
    main()
