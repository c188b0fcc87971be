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


def tiny_training_options(zip_path, **overrides):
    """training_loop() keyword arguments of a tiny in-process run on `zip_path` (8x8 images, SongUNet of 16
    channels, 4 steps of 16 images), with `overrides` applied."""
    options = dict(
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=zip_path, use_labels=False,
                            xflip=False, cache=True),
        data_loader_kwargs=dict(pin_memory=True, num_workers=0, prefetch_factor=2),
        network_kwargs=dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                            decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=16,
                            channel_mult=[1, 1], num_blocks=1, class_name='training.networks.EDMPrecond',
                            augment_dim=9, dropout=0.13, use_fp16=False),
        loss_kwargs=dict(class_name='training.loss.EDMLoss', D=128.0, stf=False),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3, betas=[0.9, 0.999], eps=1e-8),
        augment_kwargs=dict(class_name='training.augment.AugmentPipe', p=0.5, xflip=1e8, yflip=1, scale=1,
                            rotate_frac=1, aniso=1, translate_frac=1),
        seed=7, batch_size=16, total_kimg=0.064, lr_rampup_kimg=0.016, kimg_per_tick=0.032, state_dump_ticks=1,
        D=128.0, device='cpu')
    options.update(overrides)
    return options
