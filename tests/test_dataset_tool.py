"""dataset_tool.py: real source formats written by the tests, round-tripped through ImageFolderDataset."""

import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from data_helpers import make_image_zip, random_images
from training.dataset import ImageFolderDataset


def run_tool(*args):
    return CliRunner().invoke(dataset_tool.main, list(args))


def make_cifar10_tarball(folder, per_batch=4, seed=0):
    """A CIFAR-10 python tarball in the real layout (data_batch_1..5 pickles), with `per_batch` images each."""
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, size=(5 * per_batch, 3, 32, 32)).astype(np.uint8)
    labels = rng.randint(0, 10, size=5 * per_batch)
    path = os.path.join(folder, 'cifar-10-python.tar.gz')
    with tarfile.open(path, 'w:gz') as tar:
        for batch in range(5):
            rows = slice(batch * per_batch, (batch + 1) * per_batch)
            data = pickle.dumps({b'data': images[rows].reshape(per_batch, -1), b'labels': labels[rows].tolist()})
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{batch + 1}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, images.transpose(0, 2, 3, 1), labels


def make_mnist_files(folder, num=6, seed=0):
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, size=(num, 28, 28)).astype(np.uint8)
    labels = rng.randint(0, 10, size=num).astype(np.uint8)
    images_path = os.path.join(folder, 'train-images-idx3-ubyte.gz')
    with gzip.open(images_path, 'wb') as f:
        f.write(struct.pack('>IIII', 0x803, num, 28, 28) + images.tobytes())
    with gzip.open(os.path.join(folder, 'train-labels-idx1-ubyte.gz'), 'wb') as f:
        f.write(struct.pack('>II', 0x801, num) + labels.tobytes())
    return images_path, images, labels


def load_all(path):
    ds = ImageFolderDataset(path, use_labels=True)
    images = np.stack([ds[i][0] for i in range(len(ds))])
    labels = [int(ds[i][1].argmax()) for i in range(len(ds))] if ds.has_labels else None
    return ds, images, labels


def test_cifar10_round_trip(tmp_path):
    source, images, labels = make_cifar10_tarball(str(tmp_path))
    result = run_tool('--source', source, '--dest', str(tmp_path / 'out' / 'cifar10-32x32.zip'))
    assert result.exit_code == 0, result.output
    ds, loaded, loaded_labels = load_all(tmp_path / 'out' / 'cifar10-32x32.zip')
    np.testing.assert_array_equal(loaded, images.transpose(0, 3, 1, 2))
    assert loaded_labels == labels.tolist()
    with zipfile.ZipFile(tmp_path / 'out' / 'cifar10-32x32.zip') as archive:
        assert archive.namelist()[0] == '00000/img00000000.png' and archive.namelist()[-1] == 'dataset.json'
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
        assert json.loads(archive.read('dataset.json'))['labels'][1] == ['00000/img00000001.png', int(labels[1])]


def test_mnist_round_trip_pads_to_32(tmp_path):
    source, images, labels = make_mnist_files(str(tmp_path))
    result = run_tool('--source', source, '--dest', str(tmp_path / 'mnist'), '--max-images', '5')
    assert result.exit_code == 0, result.output
    ds, loaded, loaded_labels = load_all(tmp_path / 'mnist')
    assert ds.image_shape == [1, 32, 32] and len(ds) == 5
    np.testing.assert_array_equal(loaded[:, 0, 2:30, 2:30], images[:5])
    assert loaded[:, :, :2].sum() == 0 and loaded[:, :, :, 30:].sum() == 0
    assert loaded_labels == labels[:5].tolist()


def test_folder_with_class_subfolders_and_mixed_modes(tmp_path):
    rgb = random_images(4, resolution=16, seed=1)
    source = tmp_path / 'src'
    for name in ['cats', 'dogs']:
        (source / name).mkdir(parents=True)
    PIL.Image.fromarray(rgb[0]).save(source / 'cats' / 'a.png')
    PIL.Image.fromarray(rgb[1]).convert('P').save(source / 'cats' / 'b.png')
    rgba = np.concatenate([rgb[2], np.full((16, 16, 1), 255, np.uint8)], axis=2)
    rgba[0, 0, 3] = 0  # one transparent pixel: composited onto black
    PIL.Image.fromarray(rgba).save(source / 'dogs' / 'c.png')
    PIL.Image.fromarray(rgb[3]).convert('CMYK').save(source / 'dogs' / 'd.jpg', quality=100)
    result = run_tool('--source', str(source), '--dest', str(tmp_path / 'out.zip'))
    assert result.exit_code == 0, result.output
    ds, loaded, labels = load_all(tmp_path / 'out.zip')
    assert labels == [0, 0, 1, 1] and ds.image_shape == [3, 16, 16]
    np.testing.assert_array_equal(loaded[0], rgb[0].transpose(2, 0, 1))
    palette = np.array(PIL.Image.fromarray(rgb[1]).convert('P').convert('RGB'))
    np.testing.assert_array_equal(loaded[1], palette.transpose(2, 0, 1))
    expected = rgb[2].transpose(2, 0, 1).copy()
    expected[:, 0, 0] = 0
    np.testing.assert_array_equal(loaded[2], expected)
    assert np.abs(loaded[3].astype(int) - rgb[3].transpose(2, 0, 1)).mean() < 8  # JPEG via CMYK, lossy


def test_folder_labels_from_dataset_json_and_center_crop(tmp_path):
    source = tmp_path / 'src'
    source.mkdir()
    gray = random_images(2, resolution=24, channels=1, seed=2)
    for i, image in enumerate(gray):
        PIL.Image.fromarray(np.pad(image, [(0, 0), (4, 4)])).save(source / f'{i}.png')  # 32 wide x 24 high
    (source / 'dataset.json').write_text(json.dumps({'labels': [['0.png', 7], ['1.png', 3]]}))
    result = run_tool('--source', str(source), '--dest', str(tmp_path / 'out'), '--resolution=16x16',
                      '--transform=center-crop')
    assert result.exit_code == 0, result.output
    ds, loaded, labels = load_all(tmp_path / 'out')
    assert labels == [7, 3] and ds.image_shape == [1, 16, 16]  # grayscale stays grayscale
    expected = np.array(PIL.Image.fromarray(gray[0]).resize((16, 16), PIL.Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(loaded[0, 0], expected)


def test_zip_source_and_center_crop_wide(tmp_path):
    source = make_image_zip(tmp_path / 'in.zip', num=3, resolution=16, labels=[1, 2, 3])
    result = run_tool('--source', source, '--dest', str(tmp_path / 'wide.zip'), '--resolution=16x8',
                      '--transform=center-crop-wide')
    assert result.exit_code == 0, result.output
    ds, loaded, labels = load_all(tmp_path / 'wide.zip')
    assert labels == [1, 2, 3] and ds.image_shape == [3, 16, 16]
    assert loaded[:, :, :4].sum() == 0 and loaded[:, :, 12:].sum() == 0  # letterbox bars


def test_sklearn_digits_source(tmp_path):
    if not os.environ.get('CI'):  # `make test` installs scikit-learn; only ad-hoc environments may lack it
        pytest.importorskip('sklearn', reason='the digits source is optional and needs scikit-learn')
    result = run_tool('--source', 'sklearn-digits', '--dest', str(tmp_path / 'digits.zip'), '--max-images', '20')
    assert result.exit_code == 0, result.output
    ds, loaded, labels = load_all(tmp_path / 'digits.zip')
    from sklearn.datasets import load_digits
    digits = load_digits()
    assert ds.image_shape == [1, 32, 32] and len(ds) == 20 and labels == digits.target[:20].tolist()
    # Upscaling by 4 keeps each digit: block means track the 8x8 original (0..16 -> 0..255).
    blocks = loaded[:, 0].reshape(20, 8, 4, 8, 4).mean(axis=(2, 4))
    assert np.corrcoef(blocks.ravel(), digits.images[:20].ravel())[0, 1] > 0.95


@pytest.mark.parametrize('args, message', [
    (['--source', '{tmp}/missing', '--dest', '{tmp}/o.zip'], 'Missing input file or directory'),
    (['--source', '{tmp}/note.txt', '--dest', '{tmp}/o.zip'], 'Unknown source type'),
    (['--source', '{tmp}/cifar-10-python.tar.gz', '--dest', '{tmp}/o.zip'], 'Not a valid CIFAR-10'),
    (['--source', '{tmp}/bad.zip', '--dest', '{tmp}/o.zip'], 'Cannot read ZIP'),
    (['--source', '{tmp}/in.zip', '--dest', '{tmp}/o.zip', '--resolution=32'], 'cannot parse'),
    (['--source', '{tmp}/in.zip', '--dest', '{tmp}/o.zip', '--transform=center-crop'], 'must specify --resolution'),
    (['--source', '{tmp}/in.zip', '--dest', '{tmp}/o.zip', '--resolution=12x12'], 'power of two'),
    (['--source', '{tmp}/in.zip', '--dest', '{tmp}/o.zip', '--resolution=16x8'], 'square'),
    (['--source', '{tmp}/badimg', '--dest', '{tmp}/o.zip'], 'Cannot read image x.png'),
])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, args, message):
    (tmp_path / 'note.txt').write_text('hello')
    (tmp_path / 'cifar-10-python.tar.gz').write_bytes(b'corrupt')
    (tmp_path / 'bad.zip').write_bytes(b'corrupt')
    (tmp_path / 'badimg').mkdir()
    PIL.Image.new('RGB', (8, 8)).save(tmp_path / 'badimg' / 'a.png')
    (tmp_path / 'badimg' / 'x.png').write_bytes(b'not a png')
    make_image_zip(tmp_path / 'in.zip', num=2, resolution=8)
    before = sorted(os.listdir(tmp_path))
    result = run_tool(*[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert 'Traceback' not in result.output and len(result.output.strip().splitlines()[-1]) > 10
    assert sorted(os.listdir(tmp_path)) == before  # no half-written --dest, no temp files


def test_nonempty_dest_folder_is_refused(tmp_path):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'keep.txt').write_text('x')
    result = run_tool('--source', make_image_zip(tmp_path / 'in.zip', num=2), '--dest', str(tmp_path / 'out'))
    assert result.exit_code != 0 and 'must be empty' in result.output
