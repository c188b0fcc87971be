"""training/dataset.py: ImageFolderDataset against the files the tests write themselves."""

import io
import json
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from data_helpers import make_image_folder, make_image_zip, random_images
from training.dataset import ImageFolderDataset


def test_zip_items_match_written_pixels_and_labels(tmp_path):
    path = make_image_zip(tmp_path / 'tiny-8x8.zip', num=12, resolution=8, labels=True, seed=3)
    ds = ImageFolderDataset(path, use_labels=True)
    expected = random_images(12, resolution=8, seed=3)
    assert len(ds) == 12 and ds.name == 'tiny-8x8'
    assert ds.image_shape == [3, 8, 8] and ds.resolution == 8 and ds.num_channels == 3
    assert ds.label_dim == 10 and ds.has_labels and ds.has_onehot_labels
    for i in range(12):
        image, label = ds[i]
        assert image.dtype == np.uint8 and image.shape == (3, 8, 8)
        np.testing.assert_array_equal(image, expected[i].transpose(2, 0, 1))
        assert label.dtype == np.float32 and label.argmax() == i % 10 and label.sum() == 1


def test_folder_grayscale_without_labels_and_trailing_slash(tmp_path):
    folder = make_image_folder(tmp_path / 'digits', num=5, resolution=16, channels=1)
    ds = ImageFolderDataset(folder + '/', use_labels=True)  # dataset.json says null -> no labels
    assert ds.name == 'digits' and ds.image_shape == [1, 16, 16]
    assert not ds.has_labels and ds.label_dim == 0
    image, label = ds[4]
    np.testing.assert_array_equal(image[0], random_images(5, resolution=16, channels=1)[4])
    assert label.shape == (0,) and label.dtype == np.float32


def test_vector_labels(tmp_path):
    vectors = np.linspace(0, 1, 3 * 4, dtype=np.float32).reshape(3, 4)
    ds = ImageFolderDataset(make_image_zip(tmp_path / 'v.zip', num=3, labels=list(vectors)), use_labels=True)
    assert ds.label_dim == 4 and not ds.has_onehot_labels
    np.testing.assert_allclose(ds[2][1], vectors[2])


def test_max_size_is_the_reference_seeded_sorted_subset_and_xflip_doubles(tmp_path):
    ds = ImageFolderDataset(make_image_zip(tmp_path / 'a.zip', num=20), max_size=7, random_seed=5, xflip=True)
    order = np.arange(20)
    np.random.RandomState(5).shuffle(order)
    chosen = np.sort(order[:7])
    assert len(ds) == 14
    images = random_images(20)
    for i, raw in enumerate(chosen):
        np.testing.assert_array_equal(ds[i][0], images[raw].transpose(2, 0, 1))
        np.testing.assert_array_equal(ds[i + 7][0], images[raw].transpose(2, 0, 1)[:, :, ::-1])
    assert len(ImageFolderDataset(tmp_path / 'a.zip', max_size=50)) == 20


def test_palette_and_rgba_pixels(tmp_path):
    rgb = random_images(1, resolution=8)[0]
    folder = tmp_path / 'modes'
    folder.mkdir()
    PIL.Image.fromarray(rgb).convert('P').save(folder / 'a.png')
    ds = ImageFolderDataset(folder)
    palette_rgb = np.array(PIL.Image.open(folder / 'a.png').convert('RGB'))
    assert ds.image_shape == [3, 8, 8]  # palette decodes to colours, not indices
    np.testing.assert_array_equal(ds[0][0], palette_rgb.transpose(2, 0, 1))


def test_mixed_sizes_fail_up_front_naming_the_file(tmp_path):
    folder = make_image_folder(tmp_path / 'mixed', num=3, resolution=8)
    PIL.Image.new('RGB', (16, 16)).save(os.path.join(folder, '00000', 'img00000002.png'))
    with pytest.raises(ValueError, match='img00000002.png'):
        ImageFolderDataset(folder)


def test_bad_paths_and_archives(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope'):
        ImageFolderDataset(tmp_path / 'nope.zip')
    (tmp_path / 'corrupt.zip').write_bytes(b'not a zip at all')
    with pytest.raises(ValueError, match='corrupt.zip'):
        ImageFolderDataset(tmp_path / 'corrupt.zip')
    (tmp_path / 'file.txt').write_text('x')
    with pytest.raises(ValueError, match='directory or a .zip'):
        ImageFolderDataset(tmp_path / 'file.txt')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='No image files'):
        ImageFolderDataset(tmp_path / 'empty')
    folder = make_image_folder(tmp_path / 'bad', num=2)
    (tmp_path / 'bad' / '00000' / 'img00000001.png').write_bytes(b'garbage')
    with pytest.raises(ValueError, match='img00000001.png'):
        ImageFolderDataset(folder)
    with pytest.raises(ValueError, match='resolution=16'):
        ImageFolderDataset(make_image_zip(tmp_path / 'r.zip', num=2, resolution=8), resolution=16)


def test_missing_label_is_named(tmp_path):
    path = tmp_path / 'l.zip'
    with zipfile.ZipFile(path, 'w') as archive:
        for name in ['a.png', 'b.png']:
            buffer = io.BytesIO()
            PIL.Image.new('L', (4, 4)).save(buffer, format='png')
            archive.writestr(name, buffer.getvalue())
        archive.writestr('dataset.json', json.dumps({'labels': [['a.png', 1]]}))
    with pytest.raises(ValueError, match='b.png'):
        ImageFolderDataset(path, use_labels=True)
    assert not ImageFolderDataset(path).has_labels  # labels are read only when asked for


@pytest.mark.parametrize('context', ['fork', 'spawn'])
def test_pickles_and_loads_in_dataloader_workers(tmp_path, context):
    if context not in torch.multiprocessing.get_all_start_methods():
        pytest.skip(f'{context} start method not available on this platform')
    ds = ImageFolderDataset(make_image_zip(tmp_path / 'w.zip', num=10, labels=True), use_labels=True, cache=True)
    ds[0]  # the parent has the ZIP open: workers must not share its handle
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[3][0], ds[3][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context=context)
    images = torch.cat([batch for batch, _labels in loader])
    np.testing.assert_array_equal(images.numpy(), np.stack([ds[i][0] for i in range(10)]))
