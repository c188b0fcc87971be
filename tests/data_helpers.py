"""Tiny datasets made on the fly, in the on-disk format of dataset_tool.py (PNG files + dataset.json).

Other test files import these; keep the signatures stable.
"""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image


def random_images(num, resolution=8, channels=3, seed=0):
    """`num` uint8 images, shape [num, H, W, C] (C dropped for channels=1), smooth enough to look like something."""
    rng = np.random.RandomState(seed)
    base = rng.randint(0, 256, size=(num, 1, 1, channels)).astype(np.float64)
    noise = rng.randint(-40, 41, size=(num, resolution, resolution, channels))
    images = np.clip(base + noise, 0, 255).astype(np.uint8)
    return images[..., 0] if channels == 1 else images


def _png_bytes(array):
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format='png', compress_level=0)
    return buffer.getvalue()


def _dataset_entries(num, resolution, channels, labels, seed):
    """Yield (archive name, PNG bytes) for every image, then the dataset.json bytes."""
    images = random_images(num, resolution=resolution, channels=channels, seed=seed)
    names = [f'{i // 1000:05d}/img{i:08d}.png' for i in range(num)]
    for name, image in zip(names, images):
        yield name, _png_bytes(image)
    if labels is True:
        labels = [i % 10 for i in range(num)]
    label_list = None if labels is None else [[name, _plain(label)] for name, label in zip(names, labels)]
    yield 'dataset.json', json.dumps({'labels': label_list}).encode('utf8')


def _plain(label):
    return label.tolist() if isinstance(label, np.ndarray) else label


def make_image_zip(path, num=16, resolution=8, channels=3, labels=None, seed=0):
    """Write an uncompressed dataset ZIP. labels: None (no labels), True (class i % 10) or a list of ints/vectors."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as archive:
        for name, data in _dataset_entries(num, resolution, channels, labels, seed):
            archive.writestr(name, data)
    return str(path)


def make_image_folder(path, num=16, resolution=8, channels=3, labels=None, seed=0):
    """Same as make_image_zip, but a directory tree."""
    for name, data in _dataset_entries(num, resolution, channels, labels, seed):
        target = os.path.join(path, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, 'wb') as f:
            f.write(data)
    return str(path)
