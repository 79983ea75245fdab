"""Image data shared by both stages (tokenizer training, token extraction, evaluation).

Every data set built here yields ``(image, label)`` with ``image`` a float32 tensor
``[3, S, S]`` in ``[-1, 1]`` (``x = 2 * rgb / 255 - 1``) and ``label`` a Python int in
``[0, num_classes)``; every data set has ``.num_classes`` and ``.class_names``.

Six sources, chosen by ``DataConfig.name``:

``"builtin"`` (default, no download)
    Real colour photographs bundled inside scikit-image, cut into crops at several
    scales. See :class:`BuiltinPhotoCrops` for the photo list and the split design.
``"imagefolder"``
    ImageNet-style folders ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*``
    (the validation set must be sorted into class folders, as most ImageNet copies
    are). Unreadable files are skipped and counted, see :class:`SafeImageFolder`.
``"glyphs"`` (no download)
    Class-conditional images of characters (class = character, the 10 digits by default)
    rendered with the TrueType fonts that ship inside matplotlib, in random colours, sizes,
    positions and small rotations; 32 px by default. See :class:`GlyphImages`.
``"synthetic"``
    Tiny deterministic procedural images (a coloured shape on a gradient per class) for
    tests, see :class:`SyntheticShapes`.

``"hf"``
    Hugging Face ``datasets`` (Hub id, ``save_to_disk`` folder, parquet/arrow files), see ``hf.py``.
``"webdataset"``
    WebDataset tar shards, see ``webdataset.py``; ``python -m common.data.convert`` writes them.

``webdataset`` and ``hf`` with ``data.streaming=true`` are streams: no length, shards split over processes and
workers, resume as described in ``stream.py``.

One module per source (``builtin.py``, ``imagefolder.py``, ``glyphs.py``, ``synthetic.py``, ``hf.py``,
``webdataset.py``), the shared per-item helpers and photo transform in ``transforms.py``, undecodable images in
``unreadable.py``, ``DataConfig`` in ``config.py``, the dispatch in
``build.py``, evaluation subsets in ``subsets.py``. Preview or time any of them:
``python -m common.data --preview grid.png --data.name glyphs`` (``preview.py``).

Randomness: everything sampled per item (builtin crop boxes, glyph parameters, synthetic shapes) is a
pure function of ``(seed, split, index)``, so epochs and resumed runs see the same
items. Random horizontal flips (train split only) draw from torch's global RNG, which
accelerate's ``save_state``/``load_state`` restores (per DataLoader worker, torch seeds
each worker from the base seed, so flips are reproducible there too).
"""

from common.data.builtin import (BUILTIN_PHOTO_NAMES, BUILTIN_PHOTOS, DEFAULT_VAL_PHOTOS, BuiltinPhotoCrops,
                                 builtin_photo_dir, load_builtin_photo)
from common.data.build import build_image_dataset
from common.data.config import (DATASET_DEFAULTS, DATASET_NAMES, DATASET_SPLITS, DataConfig, load_data_config,
                                split_data_options)
from common.data.glyphs import GLYPH_CHARSETS, GlyphFont, GlyphImages, load_glyph_fonts, luma, matplotlib_font_dir
from common.data.hf import HFImageDataset, HFImageStream
from common.data.imagefolder import SafeImageFolder
from common.data.subsets import (class_balanced_indices, dataset_labels, dataset_size, describe_size, first_items,
                                 process_share)
from common.data.stream import ShardedImageStream, is_stream
from common.data.synthetic import SyntheticShapes
from common.data.transforms import SPLITS
from common.data.webdataset import WebDatasetImages

__all__ = [
    "BUILTIN_PHOTOS", "BUILTIN_PHOTO_NAMES", "DEFAULT_VAL_PHOTOS", "DATASET_DEFAULTS", "DATASET_NAMES", "DATASET_SPLITS",
    "GLYPH_CHARSETS", "SPLITS", "BuiltinPhotoCrops", "DataConfig", "GlyphFont", "GlyphImages", "HFImageDataset", "HFImageStream", "SafeImageFolder",
    "ShardedImageStream", "SyntheticShapes", "is_stream", "build_image_dataset", "builtin_photo_dir", "class_balanced_indices", "dataset_labels", "dataset_size", "describe_size", "first_items", "process_share",
    "load_builtin_photo", "load_data_config", "load_glyph_fonts", "luma", "matplotlib_font_dir", "split_data_options", "WebDatasetImages",
]
