"""CIFAR-10: find or download it, read it without running code from the files, validate
it, split it and standardise it.

One module per concern:

- :mod:`klayer.data.locate`: where the data is (``--data-dir``, ``$KLAYER_DATA``, the
  user cache) and the all-or-nothing download (:func:`ensure_cifar10`);
- :mod:`klayer.data.batches`: the file format, the restricted unpickler, reading and
  checking the six batch files;
- :mod:`klayer.data.standardize`: :class:`Standardizer` (x -> (x / 255 - mean) / std with
  the training split's statistics) and :func:`one_hot`;
- :mod:`klayer.data.dataset`: the splits (:func:`load_data` for a TrainConfig,
  :func:`load_cifar10` with the options spelled out);
- :mod:`klayer.data.summary`: images per class and channel statistics (:func:`describe`).

Images are rows of 3072 uint8 values (1024 red, 1024 green, 1024 blue, each 32x32
row-major), labels are int64 in 0..9. All errors about the files are :class:`DataError`
(a ``ValueError``).
"""

from klayer.data.batches import (
    BATCH_NAMES, BIN_FOLDER, CLASS_NAMES, IMAGE_SIZE, IMAGES_PER_BATCH, NUM_CLASSES,
    PY_FOLDER, TEST_BATCH, TRAIN_BATCHES, DataError, SafeUnpickler, batch_files, check_batch,
    load_batches, read_batch,
)
from klayer.data.dataset import (
    PROTOCOLS, Dataset, cifar_problem, load_cifar10, load_data, split_ranges,
)
from klayer.data.locate import (
    ENV_VAR, OFFICIAL_MD5, OFFICIAL_URL, data_root, default_cache_dir, download_target,
    ensure_cifar10, find_data_dir,
)
from klayer.data.standardize import Standardizer, one_hot
from klayer.data.summary import describe

__all__ = [
    "cifar_problem",
    "BATCH_NAMES", "BIN_FOLDER", "CLASS_NAMES", "ENV_VAR", "IMAGE_SIZE", "IMAGES_PER_BATCH",
    "NUM_CLASSES", "OFFICIAL_MD5", "OFFICIAL_URL", "PROTOCOLS", "PY_FOLDER", "TEST_BATCH",
    "TRAIN_BATCHES", "DataError", "Dataset", "SafeUnpickler", "Standardizer", "batch_files",
    "check_batch", "data_root", "default_cache_dir", "describe", "download_target",
    "ensure_cifar10", "find_data_dir", "load_batches", "load_cifar10", "load_data",
    "one_hot", "read_batch", "split_ranges",
]
