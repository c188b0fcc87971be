"""What a new user trips over: options that silently do nothing, misleading errors, options that look different in
different scripts, grids too small to see."""

import importlib
import os
import sys

import click
import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import fid
import generate
import train
from data_helpers import make_image_zip
from training.generation import GRID_GAP, GRID_GREY, save_grid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
import make_help_docs  # noqa: E402


def invoke(command, args):
    result = CliRunner().invoke(command, args)
    return result, result.output


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory):
    return make_image_zip(str(tmp_path_factory.mktemp('data') / 'tiny-8x8.zip'), num=8, resolution=8)


def test_aug_dim_without_pfgmpp_is_refused_with_the_fix(data_zip, tmp_path):
    # Bug caught: --aug_dim=64 alone silently started an EDM run.
    out = tmp_path / 'runs'
    result, output = invoke(train.main, [f'--outdir={out}', f'--data={data_zip}', '--aug_dim=64', '--dry-run'])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), output
    assert 'add --pfgmpp=1' in output and 'drop --aug_dim' in output and 'Traceback' not in output
    assert not out.exists()


def test_aug_dim_with_explicit_pfgmpp_0_trains_edm_with_a_note(data_zip, tmp_path):
    # The reference accepted --pfgmpp=0 --aug_dim=D (sweep scripts may pass both): still allowed, but said.
    result, output = invoke(train.main, [f'--outdir={tmp_path}', f'--data={data_zip}', '--pfgmpp=0',
                                         '--aug_dim=64', '--dry-run'])
    assert result.exit_code == 0, output
    assert '--aug_dim=64 is ignored' in output and '"D": null' in output
    # The default --aug_dim without --pfgmpp is plain EDM and says nothing.
    result, output = invoke(train.main, [f'--outdir={tmp_path}', f'--data={data_zip}', '--dry-run'])
    assert result.exit_code == 0 and 'aug_dim' not in output.split('Training options:')[0], output


def test_network_given_a_run_directory_suggests_run_directory_mode(tmp_path):
    # Bug caught: --network=<folder> answered "no such file".
    result, output = invoke(generate.main, [f'--network={tmp_path}', f'--outdir={tmp_path / "out"}', '--seeds=0'])
    assert result.exit_code == 1 and 'is a folder' in output and 'as --outdir without --network' in output
    assert not (tmp_path / 'out').exists()


def every_command():
    """{'script [sub-command]': click command} for every script with a help file (new scripts included)."""
    commands = {}
    for script, paths in make_help_docs.HELP_DOCS.values():
        main = importlib.import_module(script[:-len('.py')]).main
        for path in paths:
            commands[' '.join([script] + path)] = main.commands[path[0]] if path else main
    return commands


SCRIPTS = every_command()


def test_every_bool_option_shows_the_metavar_BOOL():
    # Bug caught: --pfgmpp, --align, --edm, --use_pickle showed BOOLEAN where every other option shows BOOL.
    wrong = [f'{script} {param.opts[0]}' for script, command in SCRIPTS.items() for param in command.params
             if isinstance(param, click.Option) and param.type is click.BOOL and not param.is_flag
             and param.metavar != 'BOOL']
    assert not wrong


def test_options_shared_by_scripts_have_the_same_default():
    # Bug caught: --end_ckpt defaulted to 100000000 in generate.py and 1000000 in fid.py.
    defaults = {}
    for script, command in SCRIPTS.items():
        for param in command.params:
            if param.name in ('ckpt', 'end_ckpt', 'seed', 'gen_seed'):
                defaults.setdefault(param.name, {})[script] = param.default
    assert len(defaults['end_ckpt']) >= 2 and len(set(defaults['end_ckpt'].values())) == 1, defaults
    assert len(defaults['ckpt']) >= 2 and len(set(defaults['ckpt'].values())) == 1, defaults


def test_fid_workers_default_is_at_most_the_cpus(monkeypatch):
    # Bug caught: 3 DataLoader workers on a 2-CPU machine, which PyTorch warns about.
    for cpus, expected in [(1, 1), (2, 2), (16, 3)]:
        monkeypatch.setattr(os, 'sched_getaffinity', lambda _pid, n=cpus: set(range(n)), raising=False)
        assert fid._at_most_the_cpus(None, None, None) == expected
    assert fid._at_most_the_cpus(None, None, 5) == 5  # an explicit value is kept


def test_grid_scale_enlarges_every_pixel_into_a_block(tmp_path):
    # Bug caught: a 16-image grid of 16x16 samples was a 64x64 PNG, too small to see.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=[5, 4, 4, 1], dtype=np.uint8)
    save_grid(images, str(tmp_path / 'x1.png'))
    save_grid(images, str(tmp_path / 'x3.png'), scale=3)
    small, large = np.asarray(PIL.Image.open(tmp_path / 'x1.png')), np.asarray(PIL.Image.open(tmp_path / 'x3.png'))
    assert small.shape == (8, 12) and np.array_equal(small[4:8, 0:4], images[3, :, :, 0])  # row-major, 3 columns
    gap, block = GRID_GAP, np.ones([3, 3], dtype=np.uint8)
    assert large.shape == (2 * 12 + 3 * gap, 3 * 12 + 4 * gap)
    for i, image in enumerate(images[:, :, :, 0]):
        y, x = gap + (i // 3) * (12 + gap), gap + (i % 3) * (12 + gap)
        assert np.array_equal(large[y:y + 12, x:x + 12], np.kron(image, block)), i
    assert (large[:gap] == GRID_GREY).all() and (large[:, 12 + gap:12 + 2 * gap] == GRID_GREY).all()


def test_without_tensorboard_statistics_go_to_stats_jsonl_only(tmp_path, monkeypatch, capsys):
    # tensorboard is optional: a missing package must not stop training (nor leave event files).
    import json
    from torch_utils.training_stats import StatsFiles
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # makes the import fail
    with StatsFiles(str(tmp_path)) as stats:
        stats.write({'Loss/loss': {'num': 2, 'mean': 0.5, 'std': 0.1}}, nimg=64, timestamp=12.5)
    assert 'pip install tensorboard' in capsys.readouterr().out
    assert os.listdir(tmp_path) == ['stats.jsonl']
    line = json.loads((tmp_path / 'stats.jsonl').read_text())
    assert line == {'Loss/loss': {'num': 2, 'mean': 0.5, 'std': 0.1}, 'timestamp': 12.5}


def test_demo_refuses_to_delete_a_folder_it_did_not_make(tmp_path, repo_root):
    # Bug caught: scripts/demo.sh ran `rm -rf "$DEMO_DIR"` on whatever folder it was given.
    import subprocess
    (tmp_path / 'thesis.tex').write_text('years of work')
    result = subprocess.run(['bash', os.path.join(repo_root, 'scripts', 'demo.sh')], capture_output=True, text=True,
                            env=dict(os.environ, DEMO_DIR=str(tmp_path), PYTHON='false'), timeout=60)
    assert result.returncode == 1 and 'was not made by the demo' in result.stderr
    assert os.listdir(tmp_path) == ['thesis.tex']
