"""Image datasets in the dataset_tool.py format: a folder or a ZIP of PNGs, optional labels in dataset.json.

Compared with the reference class this one checks every image's size and channels when it is built (PIL reads
only the headers), keeps the name of a folder given with a trailing slash, turns corrupt archives into clear
errors, and reopens the ZIP in every process so DataLoader workers work with both `fork` and `spawn`.
"""

import json
import os
import zipfile
import zlib

import numpy as np
import PIL.Image
import torch

# Decoded PIL mode for each stored mode, and the resulting channel count. Palette and CMYK files are decoded to
# RGB (the reference returned raw palette indices); anything else is rejected so it fails up front, not in a worker.
_DECODE_MODE = {'L': 'L', '1': 'L', 'P': 'RGB', 'RGB': 'RGB', 'CMYK': 'RGB', 'YCbCr': 'RGB', 'RGBA': 'RGBA'}
_CHANNELS = {'L': 1, 'RGB': 3, 'RGBA': 4}


def image_extensions():
    """Lower-case file extensions that PIL can read ('.png', '.jpg', ...)."""
    PIL.Image.init()
    return set(PIL.Image.EXTENSION.keys())


class ImageFolderDataset(torch.utils.data.Dataset):
    """`ds[i] -> (uint8 CHW array, float32 label array)`; see docs/internals.md for the contract."""

    def __init__(self, path, resolution=None, max_size=None, use_labels=False, xflip=False, random_seed=0,
                 cache=False):
        self._path = str(path)
        self._use_labels = bool(use_labels)
        self._cache = bool(cache)
        self._cached_images = {}
        self._zipfile = None
        self._zip_pid = None

        if os.path.isdir(self._path):
            self._type = 'dir'
            all_names = [os.path.relpath(os.path.join(root, name), self._path).replace('\\', '/')
                         for root, _dirs, files in os.walk(self._path) for name in files]
        elif os.path.isfile(self._path) and self._path.lower().endswith('.zip'):
            self._type = 'zip'
            all_names = self._get_zipfile().namelist()
        elif not os.path.exists(self._path):
            raise FileNotFoundError(f'Dataset not found: {self._path}')
        else:
            raise ValueError(f'Dataset must be a directory or a .zip file: {self._path}')

        extensions = image_extensions()
        self._image_fnames = sorted(name for name in all_names
                                    if os.path.splitext(name)[1].lower() in extensions)
        if not self._image_fnames:
            raise ValueError(f'No image files found in {self._path}')

        self._name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]
        self._raw_shape = [len(self._image_fnames)] + self._check_image_headers()
        if resolution is not None and self._raw_shape[2:] != [resolution, resolution]:
            raise ValueError(f'{self._path}: images are {self._raw_shape[3]}x{self._raw_shape[2]}, '
                             f'but resolution={resolution} was requested')
        self._raw_labels = self._load_raw_labels() if self._use_labels else None
        if self._raw_labels is None:
            self._raw_labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)

        # Subset and x-flip exactly as the reference, so the same seed picks the same images.
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    # ---------------------------------------------------------------------------------------------- file access

    def _get_zipfile(self):
        # A handle opened in another process (fork) shares its file offset with the parent: reopen per process.
        if self._zipfile is None or self._zip_pid != os.getpid():
            try:
                self._zipfile = zipfile.ZipFile(self._path)
            except (zipfile.BadZipFile, OSError) as error:
                raise ValueError(f'Cannot read ZIP archive {self._path}: {error}') from None
            self._zip_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname):
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def _check_image_headers(self):
        """[C, H, W] shared by all images; ValueError naming the first file that differs or cannot be read."""
        expected = None
        for fname in self._image_fnames:
            try:
                with self._open_file(fname) as f, PIL.Image.open(f) as image:
                    mode, size = image.mode, image.size
            except (OSError, ValueError, zipfile.BadZipFile, PIL.UnidentifiedImageError) as error:
                raise ValueError(f'Cannot read image {fname} in {self._path}: {error}') from None
            if mode not in _DECODE_MODE:
                raise ValueError(f'Image {fname} in {self._path} has unsupported mode {mode}; '
                                 f'convert the set with dataset_tool.py')
            shape = [_CHANNELS[_DECODE_MODE[mode]], size[1], size[0]]
            if expected is None:
                expected, first = shape, fname
            elif shape != expected:
                raise ValueError(f'Image {fname} in {self._path} has shape {shape} (CHW) but {first} has '
                                 f'{expected}; all images must match (re-run dataset_tool.py with --resolution)')
        return expected

    def _load_raw_image(self, raw_idx):
        fname = self._image_fnames[raw_idx]
        try:
            with self._open_file(fname) as f, PIL.Image.open(f) as image:
                image = image.convert(_DECODE_MODE[image.mode]) if image.mode != _DECODE_MODE[image.mode] else image
                array = np.array(image, dtype=np.uint8)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, PIL.UnidentifiedImageError) as error:
            raise ValueError(f'Cannot decode image {fname} in {self._path}: {error}') from None
        if array.ndim == 2:
            array = array[:, :, np.newaxis]
        array = array.transpose(2, 0, 1)
        if list(array.shape) != self._raw_shape[1:]:
            raise ValueError(f'Image {fname} in {self._path} decoded to shape {list(array.shape)}, '
                             f'expected {self._raw_shape[1:]}')
        return array

    def check_archive(self):
        """Read every member of a ZIP dataset once and check its CRC-32 (about the time of reading the file);
        ValueError naming the first damaged member. A folder has no checksums: its images are checked when read."""
        if self._type != 'zip':
            return
        try:
            damaged = self._get_zipfile().testzip()
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as error:
            raise ValueError(f'Cannot read ZIP archive {self._path}: {error}') from None
        if damaged is not None:
            raise ValueError(f'{damaged} in {self._path} is damaged (CRC-32 mismatch); rebuild the dataset with '
                             f'dataset_tool.py') from None

    def _load_raw_labels(self):
        """Labels from dataset.json as int64 [N] or float32 [N, L]; None when the file is absent or says null."""
        fname = 'dataset.json'
        if self._type == 'dir':
            if not os.path.isfile(os.path.join(self._path, fname)):
                return None
        elif fname not in self._get_zipfile().namelist():
            return None
        try:
            with self._open_file(fname) as f:
                labels = json.load(f)['labels']
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f'{self._path}: malformed dataset.json ({error!r}); '
                             f'expected {{"labels": [[name, label], ...]}} or {{"labels": null}}') from None
        if labels is None:
            return None
        try:
            by_name = {str(name).replace('\\', '/'): label for name, label in labels}
        except (TypeError, ValueError):
            raise ValueError(f'{self._path}: dataset.json "labels" must be a list of [name, label] pairs') from None
        missing = [name for name in self._image_fnames if name not in by_name]
        if missing:
            raise ValueError(f'{self._path}: dataset.json has no label for {missing[0]} '
                             f'({len(missing)} images unlabelled)')
        raw = np.array([by_name[name] for name in self._image_fnames])
        if raw.ndim == 1:
            if not np.issubdtype(raw.dtype, np.integer) or raw.min() < 0:
                raise ValueError(f'{self._path}: class labels in dataset.json must be integers >= 0')
            return raw.astype(np.int64)
        if raw.ndim == 2 and np.issubdtype(raw.dtype, np.number):
            return raw.astype(np.float32)
        raise ValueError(f'{self._path}: dataset.json labels must be class indices or equal-length vectors')

    # ---------------------------------------------------------------------------------------------- dataset API

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx):
        """float32 label of item `idx`: one-hot of length label_dim for class labels, the vector otherwise."""
        label = self._raw_labels[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            return onehot
        return label.copy()

    def close(self):
        if self._zipfile is not None:
            self._zipfile.close()
        self._zipfile = None

    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None, _zip_pid=None)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass

    @property
    def name(self):
        return self._name

    @property
    def path(self):
        return self._path

    @property
    def image_shape(self):
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self._raw_shape[1]

    @property
    def resolution(self):
        if self._raw_shape[2] != self._raw_shape[3]:
            raise ValueError(f'{self._path}: images are not square ({self._raw_shape[3]}x{self._raw_shape[2]})')
        return self._raw_shape[2]

    @property
    def label_shape(self):
        if self._raw_labels.dtype == np.int64:
            return [int(self._raw_labels.max()) + 1]
        return list(self._raw_labels.shape[1:])

    @property
    def label_dim(self):
        return self.label_shape[0]

    @property
    def has_labels(self):
        return any(dim != 0 for dim in self.label_shape)

    @property
    def has_onehot_labels(self):
        return self._raw_labels.dtype == np.int64

    @property
    def image_fnames(self):
        """File name (relative to the folder or archive) of every item, in item order."""
        return [self._image_fnames[raw_idx] for raw_idx in self._raw_idx]
