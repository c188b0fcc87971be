"""Files and folders we write get the permissions a plain open()/mkdir() gives under the umask.

The bug this guards: writing through tempfile.mkstemp/mkdtemp and renaming makes every checkpoint, dataset and
sample owner-only (0600/0700) whatever the umask, so colleagues on a shared machine cannot read them.
The end-to-end check over every file the CLIs write is in test_first_model.py.
"""

import os
import stat

import pytest
from click.testing import CliRunner

import dataset_tool
from dnnlib.util import atomic_write, create_temporary

UMASKS = [0o022, 0o027, 0o002]


@pytest.fixture(params=UMASKS, ids=lambda m: f'umask{m:03o}')
def umask(request):
    old = os.umask(request.param)  # process-wide: restored before the next test
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_new_file_follows_umask(tmp_path, umask):
    path = tmp_path / 'sub' / 'state.pt'
    with atomic_write(str(path)) as f:
        f.write(b'x')
    assert mode(path) == 0o666 & ~umask
    assert mode(path.parent) == 0o777 & ~umask
    assert os.listdir(path.parent) == ['state.pt']


def test_atomic_write_over_an_existing_file_keeps_its_mode(tmp_path, umask):
    path = tmp_path / 'options.json'
    path.write_text('old')
    os.chmod(path, 0o640)
    with atomic_write(str(path), 'w') as f:
        f.write('new')
    assert path.read_text() == 'new' and mode(path) == 0o640


def test_create_temporary_names_are_unique_and_follow_umask(tmp_path, umask):
    paths = set()
    for folder in (False, True) * 3:
        path, fd = create_temporary(str(tmp_path), '.x.', '.tmp', folder=folder)
        if fd is not None:
            os.close(fd)
        assert mode(path) == (0o777 if folder else 0o666) & ~umask
        paths.add(path)
    assert len(paths) == 6


@pytest.mark.parametrize('dest', ['data.zip', 'data'])
def test_dataset_tool_output_follows_umask(tmp_path, umask, dest):
    result = CliRunner().invoke(dataset_tool.main, ['--source=sklearn-digits', f'--dest={tmp_path / dest}',
                                                    '--resolution=8x8', '--max-images=3'])
    assert result.exit_code == 0, result.output
    written = [tmp_path / dest] + sorted((tmp_path / dest).rglob('*'))
    assert len(written) == (1 if dest.endswith('.zip') else 6)  # folder: 00000/, 3 PNGs, dataset.json
    for path in written:
        assert mode(path) == (0o777 if path.is_dir() else 0o666) & ~umask, path
    assert sorted(os.listdir(tmp_path)) == [dest]
