"""TFDS sources read through ``tfds.data_source`` (array_record), without TensorFlow.

Preparing these datasets needs TensorFlow (their builders encode images with it), so
users prepare them once elsewhere (``docs/tasks.md``) and pass the data dir
(``--data-dir``, ``TaskSampler(mix, data_dir=...)``, ``sources.data_dir`` or
$TFDS_DATA_DIR). Nothing downloads unless ``sources.download`` / ``--download`` is set.

Sources (all splits concatenated unless noted):
  mnist, tfds_fashion_mnist: 28x28 grey, 10 classes
  cifar10: 32x32 colour, 10 classes (tasks resize to 16x16)
  imagenet16: ``imagenet_resized/16x16`` train split, 1000 classes, with class groups
    ``meta_train`` and ``held_out`` (every ``imagenet_heldout_every``-th class id)
  imdb: ``imdb_reviews`` train+test, 2 classes, a binary bag of the ``imdb_vocab`` most
    frequent training words plus start, end and unknown tokens ([N, vocab + 3] float32)

Each is read once (a progress bar per split) and cached as parquet.
"""

from __future__ import annotations

import collections
import os
import re

import numpy as np
from tqdm import tqdm

from tasks.cache import cached
from tasks.registry import Dataset, SourceOptions, register

_CHUNK = 4096
_NEEDS = "a TFDS data dir prepared with TFDS (array_record format)"


def _data_dir(options: SourceOptions, tfds_name: str) -> str | None:
    data_dir = options.data_dir or os.environ.get("TFDS_DATA_DIR")
    if data_dir is None and not options.download:
        raise FileNotFoundError(
            f"source {tfds_name!r} reads a TFDS data dir: prepare it once with TFDS "
            f"(array_record format, on a machine with TensorFlow; see docs/tasks.md) and "
            f"pass --data-dir DIR (TaskSampler(data_dir=...), sources.data_dir) or set "
            f"TFDS_DATA_DIR; or pass --download to let TFDS fetch it")
    return os.path.expanduser(data_dir) if data_dir else None


def _open(tfds_name: str, split: str, options: SourceOptions):
    # Imported here, not at the top: tensorflow_datasets is heavy (a large dependency
    # tree, TensorFlow probing) and only these sources use it; every other source, and
    # every worker whose mix has no TFDS component, skips it on ``import tasks.sources``.
    import tensorflow_datasets as tfds

    data_dir = _data_dir(options, tfds_name)
    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir,
                                download=options.download)
    except Exception as err:  # noqa: BLE001 - TFDS raises several types for "not there"
        raise FileNotFoundError(
            f"TFDS dataset {tfds_name!r} split {split!r} not found in data dir {data_dir}: "
            f"prepare it with TFDS in array_record format and pass its folder with "
            f"--data-dir (TFDS said: {type(err).__name__}: {str(err)[:200]})") from None


def _read_all(source, desc: str, progress: bool, convert=None) -> list:
    """Every example of a data source, read once in chunks (then cached as parquet).

    convert: maps a chunk (list of example dicts) to something compact (e.g. stacked
    arrays), so a million-example split is never held as a million dicts.
    Returns the list of converted chunks (or of examples when ``convert`` is None).
    """
    n = len(source)
    out: list = []
    with tqdm(total=n, desc=desc, unit="ex", disable=not progress) as bar:
        for start in range(0, n, _CHUNK):
            keys = list(range(start, min(n, start + _CHUNK)))
            try:
                chunk = list(source.__getitems__(keys))
            except Exception:  # noqa: BLE001 - some sources lack batched reads
                chunk = [source[k] for k in keys]
            if convert is None:
                out.extend(chunk)
            else:
                out.append(convert(chunk))
            bar.update(len(keys))
    return out


def _label_names(source, num_classes: int) -> tuple[str, ...]:
    try:
        names = source.dataset_info.features["label"].names
        if names and len(names) == num_classes:
            return tuple(str(n) for n in names)
    except Exception:  # noqa: BLE001 - names are cosmetic
        pass
    return tuple(str(i) for i in range(num_classes))


def _num_classes(source) -> int:
    return int(source.dataset_info.features["label"].num_classes)


def _image_source(name: str, tfds_name: str, splits: tuple[str, ...], options: SourceOptions,
                  progress: bool, groups=None) -> Dataset:
    sources = {split: _open(tfds_name, split, options) for split in splits}
    first = sources[splits[0]]
    inputs = {"tfds": tfds_name, "splits": {s: len(src) for s, src in sources.items()},
              "data_dir": os.path.realpath(options.data_dir or os.environ.get("TFDS_DATA_DIR", "")),
              "version": str(getattr(first.dataset_info, "version", ""))}

    def build() -> Dataset:
        xs, ys = [], []
        def convert(chunk):
            return (np.stack([np.asarray(e["image"], np.uint8) for e in chunk]),
                    np.asarray([int(e["label"]) for e in chunk], np.int32))

        for split, src in sources.items():
            for images, labels in _read_all(src, f"{name}:{split}", progress, convert):
                xs.append(images)
                ys.append(labels)
        x = np.concatenate(xs)
        if x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]  # grey images are stored [N, H, W]
        num_classes = _num_classes(first)
        return Dataset(name, x, np.concatenate(ys), _label_names(first, num_classes), "image",
                       groups(num_classes) if groups else {},
                       info={"origin": f"tfds:{tfds_name}", "splits": inputs["splits"]})

    return cached(name, inputs, build, options)


@register("mnist", "MNIST 28x28 grey, 10 classes (TFDS)", needs=_NEEDS)
def build_mnist(options: SourceOptions, progress: bool = True) -> Dataset:
    return _image_source("mnist", "mnist", ("train", "test"), options, progress)


@register("tfds_fashion_mnist", "Fashion-MNIST 28x28 grey, 10 classes (TFDS)", needs=_NEEDS)
def build_tfds_fashion_mnist(options: SourceOptions, progress: bool = True) -> Dataset:
    return _image_source("tfds_fashion_mnist", "fashion_mnist", ("train", "test"), options,
                         progress)


@register("cifar10", "CIFAR-10 32x32 colour, 10 classes (TFDS)", needs=_NEEDS)
def build_cifar10(options: SourceOptions, progress: bool = True) -> Dataset:
    return _image_source("cifar10", "cifar10", ("train", "test"), options, progress)


def imagenet_groups(num_classes: int, every: int) -> dict[str, tuple[int, ...]]:
    held = tuple(range(every - 1, num_classes, every))
    held_set = set(held)
    return {"meta_train": tuple(c for c in range(num_classes) if c not in held_set),
            "held_out": held}


@register("imagenet16", "ImageNet 16x16 colour (imagenet_resized/16x16 train), 1000 classes, "
          "groups meta_train / held_out (TFDS)", needs=_NEEDS)
def build_imagenet16(options: SourceOptions, progress: bool = True) -> Dataset:
    every = options.imagenet_heldout_every
    return _image_source("imagenet16", "imagenet_resized/16x16", ("train",), options, progress,
                         groups=lambda n: imagenet_groups(n, every))


_WORD = re.compile(r"[a-z0-9']+")
IMDB_TOKENS = ("<start>", "<end>", "<unk>")


def tokenize(text: bytes | str) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return _WORD.findall(text.replace("<br />", " ").lower())


def bag_of_words(docs: list[list[str]], vocab: list[str]) -> np.ndarray:
    """Binary bags [N, len(vocab) + 3]: vocabulary words, then start, end, unknown."""
    index = {w: i for i, w in enumerate(vocab)}
    unk = len(vocab) + 2
    rows, cols = [], []
    for r, words in enumerate(docs):
        ids = {index.get(w, unk) for w in words}
        rows.extend([r] * len(ids))
        cols.extend(ids)
    x = np.zeros((len(docs), len(vocab) + 3), np.float32)
    x[np.asarray(rows, np.int64), np.asarray(cols, np.int64)] = 1.0
    x[:, len(vocab)] = 1.0  # every review has a start
    x[:, len(vocab) + 1] = 1.0  # and an end token
    return x


@register("imdb", "IMDB reviews as binary bags of the top words (+start/end/unknown), "
          "2 classes (TFDS imdb_reviews)", needs=_NEEDS)
def build_imdb(options: SourceOptions, progress: bool = True) -> Dataset:
    splits = ("train", "test")
    sources = {s: _open("imdb_reviews", s, options) for s in splits}
    inputs = {"tfds": "imdb_reviews", "splits": {s: len(src) for s, src in sources.items()},
              "data_dir": os.path.realpath(options.data_dir or os.environ.get("TFDS_DATA_DIR", "")),
              "vocab": options.imdb_vocab}

    def build() -> Dataset:
        docs, labels = {}, {}
        for split, src in sources.items():
            examples = _read_all(src, f"imdb:{split}", progress)
            docs[split] = [tokenize(e["text"]) for e in examples]
            labels[split] = np.asarray([int(e["label"]) for e in examples], np.int32)
        # Vocabulary from the training split only, ties broken alphabetically (deterministic).
        counts = collections.Counter(w for doc in docs["train"] for w in doc)
        vocab = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        vocab = vocab[:options.imdb_vocab]
        x = np.concatenate([bag_of_words(docs[s], vocab) for s in splits])
        return Dataset("imdb", x, np.concatenate([labels[s] for s in splits]),
                       ("negative", "positive"), "text",
                       info={"origin": "tfds:imdb_reviews", "vocab": vocab[:50],
                             "features": vocab and len(vocab) + 3, "tokens": IMDB_TOKENS})

    return cached("imdb", inputs, build, options)
