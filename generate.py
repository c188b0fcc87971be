"""Generate images with a trained EDM / PFGM++ network.

    python generate.py --network=training-runs/00000-.../training-state-000500.pt --outdir=out --seeds=0-63
    torchrun --standalone --nproc_per_node=8 generate.py --seeds=0-49999 --outdir=./training-runs/exp_name \\
        --pfgmpp=1 --aug_dim=128          # every checkpoint of the run → ckpt_XXXXXX/ folders

The prior (Gaussian or the PFGM++ kernel with the checkpoint's D) and the sampler live in training/; see
training/generation.py for the folder layout.
"""

import click

from generate_cli import common_options, run_script


@click.command()
@common_options
def main(**opts):
    """Generate images: from one --network file, or from every checkpoint of the run directory --outdir."""
    run_script(opts)


if __name__ == '__main__':
    main()
