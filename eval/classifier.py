"""An offline classifier metric for class-conditional data sets: accuracy, FD-<dataset>, KID-<dataset>, precision
and recall.

    python -m eval.classifier --data.name glyphs [--output-dir outputs/classifiers/glyphs-32px]
                              [--epochs 4] [--seed 0] [--threads N] [--samples samples.npz]

FID needs ImageNet Inception weights (a download) and measures ImageNet features, which say little about
32 px digits. This module trains a small CNN on the TRAIN split of the data set being generated (no
download), caches it, and measures with it:

* accuracy of class-conditional samples: the fraction of samples of requested class c that the classifier
  labels c (mean over samples and per class) - "does a sample of class c look like c?";
* accuracy on reconstructions decode(encode(x)) of val images (their labels are the images' labels);
* FD-<dataset> and KID-<dataset>: the Frechet distance and the kernel (polynomial, MMD^2) distance between
  the classifier's penultimate features of real val images and of samples / reconstructions. The
  classifier is registered as a torch-fidelity feature extractor (``CLASSIFIER_FEATURE_EXTRACTOR``) and the
  distances come from ``torch_fidelity.calculate_metrics`` (fid=True, kid=True): the formulas are
  torch-fidelity's, only the features are ours. They are NOT FID/KID (different network, different
  features); compare them only between runs that use the same cached classifier.

Cache (``--output-dir``, default ``outputs/classifiers/<data.name>-<image_size>px``)::

    OUT/model/               ImageClassifier.save_pretrained (config.json + safetensors)
    OUT/classifier.json      data set name and full data config, image size, classes, training recipe
                             (seed, epochs, ...), accuracy on real val (mean and per class), time

The first call trains (deterministic on CPU for a given seed and torch thread count: seeded init, seeded
shuffling, no data workers) and writes the folder atomically; later calls load it. A cached classifier
whose data set, data config, image size, classes or training recipe differ from the request raises
:class:`ClassifierCacheMismatch` naming the differences - it is never retrained or mixed silently.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from tqdm.auto import tqdm

from common.files import file_lock, publish_folder, temporary_path, write_bytes_atomic
from common.config import with_later_defaults
from common.data import DataConfig, GlyphImages, build_image_dataset, first_items, load_data_config, split_data_options
from common.metrics import (PRC_NEIGHBORHOOD, PRC_PROTOCOL, nonnegative_distance, precision_recall, thumbnail_images,
                            to_uint8)

CLASSIFIER_FEATURE_EXTRACTOR = "lgq-classifier"
METADATA_FILE = "classifier.json"
MODEL_SUBFOLDER = "model"
METADATA_VERSION = 1
# Data options that do not change which images the classifier is trained and validated on.
DATA_KEYS_NOT_IDENTIFYING = ("num_workers",)


class ClassifierCacheMismatch(ValueError):
    """A cached classifier was made for another data set, image size, class list or training recipe."""


# ----------------------------------------------------------------------------- model
class ImageClassifier(ModelMixin, ConfigMixin):
    """A small CNN. Input standardisation (``standardise_input``, default on): each image's channels are
    shifted and scaled to zero mean and unit variance, x' = (x - mean_HW(x)) / sqrt(var_HW(x) + 1e-4), so
    the class does not have to be learnt separately for every colour pair and contrast. Images larger than
    ``working_size`` are average-pooled to it (``F.adaptive_avg_pool2d``; default 16 px: enough for
    characters and shapes, and cheap on a CPU). Then per width w,
    conv3x3(w) -> BatchNorm -> ReLU -> conv3x3(w) -> BatchNorm -> ReLU -> 2x2 max-pool; then global average
    pooling, ``features = Linear(widths[-1], feature_dim)`` (the penultimate features used for FD/KID)
    and ``logits = Linear(feature_dim, num_classes)(ReLU(features))``.

    Inputs: float images [B, 3, S, S] in [-1, 1] (the project's convention) with S = ``image_size``.
    """

    @register_to_config
    def __init__(self, num_classes: int, image_size: int, widths: Sequence[int] = (32, 64, 128),
                 feature_dim: int = 64, in_channels: int = 3, standardise_input: bool = True,
                 working_size: int = 16):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 for a classifier, got {num_classes}")
        if min(image_size, working_size) < 2 ** len(widths):
            raise ValueError(f"image_size {image_size} / working_size {working_size} is too small for "
                             f"{len(widths)} pooling stages")
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [nn.Conv2d(channels, int(width), 3, padding=1, bias=False), nn.BatchNorm2d(int(width)),
                       nn.ReLU(inplace=True), nn.Conv2d(int(width), int(width), 3, padding=1, bias=False),
                       nn.BatchNorm2d(int(width)), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = int(width)
        self.body = nn.Sequential(*layers)
        self.to_features = nn.Linear(channels, int(feature_dim))
        self.head = nn.Linear(int(feature_dim), int(num_classes))

    def check_input(self, images: torch.Tensor) -> None:
        size = int(self.config.image_size)
        if images.dim() != 4 or images.shape[1] != self.config.in_channels or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"the classifier was trained on [B, {self.config.in_channels}, {size}, {size}] images; "
                             f"got shape {tuple(images.shape)} (another image size needs another classifier)")

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, feature_dim], logits [B, num_classes]) of float images in [-1, 1]."""
        self.check_input(images)
        if self.config.standardise_input:
            mean = images.mean(dim=(2, 3), keepdim=True)
            images = (images - mean) / torch.sqrt(images.var(dim=(2, 3), keepdim=True, unbiased=False) + 1e-4)
        if images.shape[-1] > self.config.working_size:
            images = F.adaptive_avg_pool2d(images, self.config.working_size)
        pooled = self.body(images).mean(dim=(2, 3))
        features = self.to_features(pooled)
        return features, self.head(F.relu(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]


def uint8_to_unit_range(images_u8: torch.Tensor) -> torch.Tensor:
    """x = 2 * u / 255 - 1: uint8 images back to the project's float range [-1, 1]."""
    return images_u8.float() / 127.5 - 1.0


@torch.no_grad()
def predict(classifier: ImageClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class (argmax of the logits) of uint8 or float [-1, 1] images, int64 [N] on the CPU."""
    classifier.eval()
    device = next(classifier.parameters()).device
    predictions = []
    for start in range(0, images.shape[0], batch_size):
        batch = to_uint8(images[start:start + batch_size])
        predictions.append(classifier(uint8_to_unit_range(batch.to(device))).argmax(dim=1).cpu())
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64)


@torch.no_grad()
def penultimate_features(classifier: ImageClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The penultimate features (those FD/KID use) of uint8 or float [-1, 1] images, float32 [N, D] on the CPU."""
    classifier.eval()
    device = next(classifier.parameters()).device
    features = [classifier.features_and_logits(uint8_to_unit_range(to_uint8(images[start:start + batch_size])
                                                                   .to(device)))[0].float().cpu()
                for start in range(0, images.shape[0], batch_size)]
    return torch.cat(features)


def classification_accuracy(predictions: torch.Tensor, labels: torch.Tensor,
                            class_names: Sequence[str]) -> dict[str, Any]:
    """accuracy = mean_i [pred_i = label_i]; per class c: the same mean over items with label c (None if none).

    Returns ``{"accuracy", "per_class_accuracy": {class name: value}, "num_images"}``.
    """
    labels = torch.as_tensor(labels).long().reshape(-1)
    predictions = torch.as_tensor(predictions).long().reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"{predictions.numel()} predictions for {labels.numel()} labels")
    if labels.numel() == 0:
        raise ValueError("no images to classify")
    num_classes = len(class_names)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) (the classifier's classes), "
                         f"got range [{int(labels.min())}, {int(labels.max())}]")
    correct = (predictions == labels).double()
    per_class = {}
    for c, name in enumerate(class_names):
        mask = labels == c
        per_class[str(name)] = float(correct[mask].mean()) if bool(mask.any()) else None
    return {"accuracy": float(correct.mean()), "per_class_accuracy": per_class, "num_images": int(labels.numel())}


# ----------------------------------------------------------------------------- training + cache
@dataclass
class ClassifierTrainConfig:
    """Training recipe of the classifier (recorded in classifier.json; part of the cache identity).

    epochs: passes over the (first ``max_train_images``) train images; batch_size; learning_rate: peak of
    a one-cycle schedule (AdamW, weight decay ``weight_decay``); seed: initialisation and shuffling;
    widths / feature_dim / working_size: the CNN (``ImageClassifier``).

    Defaults measured on glyphs (10 digits, 32 px, 1 torch thread on the 2-core CPU): 6000 images x 3 epochs
    reached 99.6% on real val in 35 s; 10000 x 4 epochs 100%. Without the input standardisation and the
    16 px working size, 5000 x 4 epochs of a one-conv-per-stage net reached only 76%.
    """

    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    max_train_images: int | None = 8000
    seed: int = 0
    widths: tuple = (16, 32, 64)
    feature_dim: int = 64
    working_size: int = 16

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        for key in ("epochs", "batch_size", "feature_dim", "working_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"classifier {key} must be a positive integer, got {value!r}")
        if self.max_train_images is not None and self.max_train_images < 1:
            raise ValueError(f"classifier max_train_images must be positive or None, got {self.max_train_images}")
        if not self.learning_rate > 0:
            raise ValueError(f"classifier learning_rate must be positive, got {self.learning_rate}")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"classifier widths must be positive integers, got {self.widths}")


def classifier_dir(root: str | os.PathLike, data_cfg) -> Path:
    """Where the classifier of a data set is cached under ``root``: ``<root>/<name>-<size>px``, with ``-tune<r>``
    when the builtin photos hold a tuning square of side r out of train (another training set: the study's
    tuning trials and its sweep share one ``root``)."""
    tune_region = float(getattr(data_cfg, "tune_region", 0.0) or 0.0)
    suffix = f"-tune{tune_region:g}" if data_cfg.name == "builtin" and tune_region > 0 else ""
    return Path(root) / f"{data_cfg.name}-{data_cfg.image_size}px{suffix}"


def default_classifier_dir(data_cfg) -> Path:
    return classifier_dir(Path("outputs") / "classifiers", data_cfg)


def load_split(data_cfg, split: str, max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(uint8 images [N, 3, S, S], int64 labels [N], data set) of the first ``max_images`` items of a split (of
    any source: a stream's first images in shard order, ``common.data.first_items``)."""
    dataset = build_image_dataset(data_cfg, split)
    images, labels = [], []
    for image, label in first_items(dataset, None if max_images is None else int(max_images)):
        images.append(to_uint8(image))
        labels.append(int(label))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), dataset


def data_identity(data_cfg) -> dict[str, Any]:
    """The data config fields that define the classifier's data (everything but ``DATA_KEYS_NOT_IDENTIFYING``)."""
    config = dataclasses.asdict(data_cfg)
    identity = {k: v for k, v in sorted(config.items()) if k not in DATA_KEYS_NOT_IDENTIFYING}
    if data_cfg.name == "glyphs":  # the rendering ranges live in the code: a cache made with other ranges must not match
        identity["glyph_geometry"] = GlyphImages.geometry()
    return identity


def train_classifier(data_cfg, train_cfg: ClassifierTrainConfig | None = None,
                     device: str | torch.device = "cpu", progress: bool = True) -> tuple[ImageClassifier, dict]:
    """Train on the train split, measure on the whole val split; returns (classifier in eval mode, metadata).

    Runs inside ``torch.random.fork_rng``, seeded with ``train_cfg.seed`` before the data are read (data sets
    with random flips draw them from torch's global RNG), so the caller's RNG state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((train_cfg or ClassifierTrainConfig()).seed)
        return _train_classifier(data_cfg, train_cfg, device, progress)


def _train_classifier(data_cfg, train_cfg: ClassifierTrainConfig | None, device, progress: bool):
    train_cfg = train_cfg or ClassifierTrainConfig()
    device = torch.device(device)
    start = time.time()
    images, labels, train_set = load_split(data_cfg, "train", train_cfg.max_train_images)
    class_names = [str(n) for n in train_set.class_names]
    num_classes = len(class_names)
    if num_classes < 2:
        raise ValueError(f"data set {data_cfg.name!r} has {num_classes} class: a classifier needs at least 2")
    torch.manual_seed(train_cfg.seed)
    classifier = ImageClassifier(num_classes=num_classes, image_size=int(images.shape[-1]), widths=train_cfg.widths,
                                 feature_dim=train_cfg.feature_dim, working_size=train_cfg.working_size).to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=train_cfg.learning_rate,
                                  weight_decay=train_cfg.weight_decay)
    steps_per_epoch = math.ceil(images.shape[0] / train_cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train_cfg.learning_rate,
                                                   total_steps=steps_per_epoch * train_cfg.epochs)
    shuffle = torch.Generator().manual_seed(train_cfg.seed)
    iterator = range(train_cfg.epochs)
    if progress:
        iterator = tqdm(iterator, desc=f"classifier ({data_cfg.name}, {images.shape[0]} train images)")
    classifier.train()
    loss = torch.zeros(())
    for _ in iterator:
        order = torch.randperm(images.shape[0], generator=shuffle)
        for step in range(steps_per_epoch):
            batch = order[step * train_cfg.batch_size:(step + 1) * train_cfg.batch_size]
            logits = classifier(uint8_to_unit_range(images[batch].to(device)))
            loss = F.cross_entropy(logits, labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if progress:
            iterator.set_postfix(loss=f"{float(loss.detach()):.4f}")
    classifier.eval()
    train_seconds = time.time() - start
    val_images, val_labels, _ = load_split(data_cfg, "val")
    val = classification_accuracy(predict(classifier, val_images), val_labels, class_names)
    metadata = {
        "version": METADATA_VERSION,
        "dataset": {"name": data_cfg.name, "image_size": int(images.shape[-1]), "num_classes": num_classes,
                    "class_names": class_names, "config": data_identity(data_cfg)},
        "training": dataclasses.asdict(train_cfg) | {"widths": list(train_cfg.widths)},
        "num_train_images": int(images.shape[0]),
        "final_train_loss": float(loss.detach()),
        "real_val_accuracy": val["accuracy"],
        "real_val_per_class_accuracy": val["per_class_accuracy"],
        "num_val_images": val["num_images"],
        "train_seconds": round(train_seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
    }
    return classifier, metadata


def read_metadata(folder: str | os.PathLike) -> dict:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a classifier cache: {METADATA_FILE} is missing "
                                f"(delete the folder or train with python -m eval.classifier)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupt ({err}); delete {folder} to retrain") from err


def check_metadata(metadata: dict, folder: str | os.PathLike, data_cfg=None,
                   train_cfg: ClassifierTrainConfig | None = None) -> None:
    """Raise ClassifierCacheMismatch naming every field in which the cache differs from the request."""
    differences = []
    if data_cfg is not None:
        # keys added to DataConfig after the cache was made held their defaults then (common.config.with_later_defaults)
        defaults = {k: v for k, v in dataclasses.asdict(DataConfig()).items() if k not in DATA_KEYS_NOT_IDENTIFYING}
        cached = with_later_defaults(metadata["dataset"]["config"], json.loads(json.dumps(defaults)))
        wanted = json.loads(json.dumps(data_identity(data_cfg)))
        for key in sorted(set(cached) | set(wanted)):
            if cached.get(key) != wanted.get(key):
                differences.append(f"data.{key}: cached {cached.get(key)!r}, requested {wanted.get(key)!r}")
    if train_cfg is not None:
        cached = metadata["training"]
        wanted = json.loads(json.dumps(dataclasses.asdict(train_cfg) | {"widths": list(train_cfg.widths)}))
        for key in sorted(set(cached) | set(wanted)):
            if cached.get(key) != wanted.get(key):
                differences.append(f"training.{key}: cached {cached.get(key)!r}, requested {wanted.get(key)!r}")
    if differences:
        dataset = metadata["dataset"]
        raise ClassifierCacheMismatch(
            f"the classifier cached in {folder} was made for data set {dataset['name']!r} at "
            f"{dataset['image_size']} px ({dataset['num_classes']} classes) with another configuration: "
            + "; ".join(differences)
            + ". It is neither retrained nor reused: pass another classifier folder or delete this one.")


def load_classifier(folder: str | os.PathLike, data_cfg=None, train_cfg: ClassifierTrainConfig | None = None,
                    device: str | torch.device = "cpu") -> tuple[ImageClassifier, dict]:
    """Load a cached classifier, checked against the requested data config / recipe when given."""
    metadata = read_metadata(folder)
    check_metadata(metadata, folder, data_cfg, train_cfg)
    classifier = ImageClassifier.from_pretrained(str(Path(folder) / MODEL_SUBFOLDER)).to(device).eval()
    if classifier.config.image_size != metadata["dataset"]["image_size"] or \
            classifier.config.num_classes != metadata["dataset"]["num_classes"]:
        raise ValueError(f"{folder}: the model ({classifier.config.image_size} px, {classifier.config.num_classes} "
                         f"classes) does not match {METADATA_FILE}; delete the folder to retrain")
    return classifier, metadata


def load_or_train_classifier(folder: str | os.PathLike, data_cfg, train_cfg: ClassifierTrainConfig | None = None,
                             device: str | torch.device = "cpu", progress: bool = True) -> tuple[ImageClassifier, dict, bool]:
    """(classifier, metadata, trained_now): load the cache in ``folder`` or train once and publish it atomically.

    Safe with several processes asking at once (e.g. two study slices): the first one trains under
    ``common.files.file_lock(folder)``, the others wait for it and load what it wrote."""
    folder = Path(folder)
    train_cfg = train_cfg or ClassifierTrainConfig()
    with file_lock(folder):
        if folder.exists():
            classifier, metadata = load_classifier(folder, data_cfg, train_cfg, device)
            return classifier, metadata, False
        classifier, metadata = train_classifier(data_cfg, train_cfg, device, progress=progress)
        tmp = temporary_path(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        classifier.save_pretrained(tmp / MODEL_SUBFOLDER, safe_serialization=True)
        write_bytes_atomic(tmp / METADATA_FILE, json.dumps(metadata, indent=2, sort_keys=True).encode())
        publish_folder(tmp, folder)
    return classifier, metadata, True


# ----------------------------------------------------------------------------- torch-fidelity
class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor of a cached :class:`ImageClassifier`.

    Created by torch-fidelity with ``feature_extractor=CLASSIFIER_FEATURE_EXTRACTOR`` and
    ``feature_extractor_weights_path=<classifier cache folder>``; takes uint8 [B, 3, S, S] batches and
    provides "features" (penultimate, used for FD and KID) and "logits".
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor {name!r} needs feature_extractor_weights_path=<classifier folder>")
        self.classifier, self.metadata = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "features", "kid": "features", "prc": "features", "isc": "logits"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, images_u8):
        if images_u8.dtype != torch.uint8:
            raise TypeError(f"{CLASSIFIER_FEATURE_EXTRACTOR} expects uint8 images, got {images_u8.dtype}")
        features, logits = self.classifier.features_and_logits(uint8_to_unit_range(images_u8))
        provided = {"features": features, "logits": logits}
        return tuple(provided[name] for name in self.features_list)


def register_with_torch_fidelity() -> None:
    if FEATURE_EXTRACTORS_REGISTRY.get(CLASSIFIER_FEATURE_EXTRACTOR) is not ClassifierFeatureExtractor:
        FEATURE_EXTRACTORS_REGISTRY.pop(CLASSIFIER_FEATURE_EXTRACTOR, None)  # a reloaded module re-registers
        register_feature_extractor(CLASSIFIER_FEATURE_EXTRACTOR, ClassifierFeatureExtractor)


register_with_torch_fidelity()


class _Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images_u8: torch.Tensor):
        self.images = images_u8

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def feature_distances(folder: str | os.PathLike, real_images: torch.Tensor, other_images: torch.Tensor,
                      device: str | torch.device = "cpu", kid_subset_size: int = 1000, kid_subsets: int = 100,
                      seed: int = 0) -> dict[str, Any]:
    """FD-<dataset>, KID-<dataset> (torch-fidelity) and precision/recall of ``other_images`` against
    ``real_images`` (``common.metrics.precision_recall``, k = 3) on the classifier features of two image sets.

    FD = |mu_r - mu_o|^2 + tr(S_r + S_o - 2 (S_r S_o)^(1/2)) over the penultimate features;
    KID = mean over ``kid_subsets`` random subsets of size min(kid_subset_size, N_r, N_o) of the unbiased
    MMD^2 with the kernel k(a, b) = (a.b / d + 1)^3 (torch-fidelity's defaults). Returns
    ``{"fd", "kid_mean", "kid_std", "fd_name", "kid_name", "num_real", "num_other", "kid_subset_size",
    "precision", "recall"}``.
    """
    metadata = read_metadata(folder)
    real_u8, other_u8 = to_uint8(real_images).cpu(), to_uint8(other_images).cpu()
    if min(real_u8.shape[0], other_u8.shape[0]) < 2:
        raise ValueError(f"FD/KID need at least 2 images per set, got {real_u8.shape[0]} and {other_u8.shape[0]}")
    subset = min(int(kid_subset_size), real_u8.shape[0], other_u8.shape[0])
    metrics = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(real_u8), input2=_Uint8Images(other_u8), fid=True, kid=True,
        feature_extractor=CLASSIFIER_FEATURE_EXTRACTOR, feature_extractor_weights_path=str(folder),
        kid_subset_size=subset, kid_subsets=kid_subsets, rng_seed=seed, cuda=torch.device(device).type == "cuda",
        batch_size=256, cache=False, save_cpu_ram=True, verbose=False)
    name = metadata["dataset"]["name"]
    classifier, _ = load_classifier(folder)
    prc = precision_recall(penultimate_features(classifier, real_u8), penultimate_features(classifier, other_u8))
    # torch-fidelity does not clamp the FD's rounding residue at 0 (common.metrics.nonnegative_distance does)
    return {"fd": nonnegative_distance(metrics["frechet_inception_distance"]), "kid_mean": float(metrics["kernel_inception_distance_mean"]),
            "kid_std": float(metrics["kernel_inception_distance_std"]), "fd_name": f"FD-{name}",
            "kid_name": f"KID-{name}", "num_real": int(real_u8.shape[0]), "num_other": int(other_u8.shape[0]),
            "kid_subset_size": subset, "precision": prc["precision"], "recall": prc["recall"]}


def classifier_report(folder: str | os.PathLike, classifier: ImageClassifier, metadata: dict,
                      images: torch.Tensor, labels: torch.Tensor, real_val_images: torch.Tensor,
                      device: str | torch.device = "cpu", kid_subsets: int = 100) -> dict[str, Any]:
    """Flat ``classifier_*`` figures of a labelled image set (samples or reconstructions) vs real val:

    ``classifier_accuracy``, ``classifier_per_class_accuracy``, ``classifier_real_val_accuracy`` (from the
    cache), ``classifier_fd`` / ``classifier_kid_mean`` / ``classifier_kid_std`` with their names
    (``classifier_fd_name`` = "FD-<dataset>", ...) and ``classifier_protocol``.
    """
    class_names = metadata["dataset"]["class_names"]
    accuracy = classification_accuracy(predict(classifier, images), labels, class_names)
    distances = feature_distances(folder, real_val_images, images, device=device, kid_subsets=kid_subsets)
    return {
        "classifier_accuracy": accuracy["accuracy"],
        "classifier_per_class_accuracy": accuracy["per_class_accuracy"],
        "classifier_real_val_accuracy": metadata["real_val_accuracy"],
        "classifier_fd": distances["fd"], "classifier_fd_name": distances["fd_name"],
        "classifier_kid_mean": distances["kid_mean"], "classifier_kid_std": distances["kid_std"],
        "classifier_kid_name": distances["kid_name"],
        "classifier_precision": distances["precision"], "classifier_recall": distances["recall"],
        "classifier_protocol": {
            "classifier": str(Path(folder).resolve()), "dataset": metadata["dataset"]["name"],
            "image_size": metadata["dataset"]["image_size"], "num_images": accuracy["num_images"],
            "num_real_val_images": distances["num_real"], "kid_subset_size": distances["kid_subset_size"],
            "kid_subsets": kid_subsets,
            "features": f"penultimate layer ({classifier.config.feature_dim}-d) of eval.classifier.ImageClassifier",
            "distances": "torch_fidelity.calculate_metrics (fid, kid) with the classifier registered as feature "
                         f"extractor {CLASSIFIER_FEATURE_EXTRACTOR!r}; not comparable with FID/KID",
            "precision_recall": PRC_PROTOCOL.format(k=PRC_NEIGHBORHOOD, features="the classifier's penultimate "
                                                    "features") + " (the real images: the val split)",
        },
    }


def sanity_figures(folder: str | os.PathLike, classifier: ImageClassifier, metadata: dict, data_cfg,
                   device: str | torch.device = "cpu", seed: int = 0) -> dict[str, float]:
    """What the metric reads on known cases, from the real val split (shuffled with ``seed``, cut in halves A, B):

    FD/KID(A, B) (two draws of the real distribution: near 0), FD/KID(A, blur(B)) with blur = bicubic
    upsampling of an S/4 x S/4 thumbnail (``common.metrics.thumbnail_images``: clearly larger), and the accuracy of "samples" that ignore the requested labels (B with A's labels: chance,
    1 / num_classes for balanced classes) next to the accuracy on B with its own labels.
    """
    images, labels, _ = load_split(data_cfg, "val")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    half = images.shape[0] // 2
    first, second = order[:half], order[half:2 * half]
    same = feature_distances(folder, images[first], images[second], device=device, seed=seed)
    side = images.shape[-1] // 4
    blurred = feature_distances(folder, images[first], thumbnail_images(images[second], (side, side)),
                                device=device, seed=seed)
    class_names = metadata["dataset"]["class_names"]
    predictions = predict(classifier, images[second])
    return {
        "fd_real_half_vs_half": same["fd"], "kid_real_half_vs_half": same["kid_mean"],
        "fd_real_vs_blurred": blurred["fd"], "kid_real_vs_blurred": blurred["kid_mean"],
        "accuracy_own_labels": classification_accuracy(predictions, labels[second], class_names)["accuracy"],
        "accuracy_labels_ignored": classification_accuracy(predictions, labels[first], class_names)["accuracy"],
        "chance": 1.0 / len(class_names),
    }


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    rest, data_overrides = split_data_options(argv)
    parser = argparse.ArgumentParser(prog="python -m eval.classifier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=None,
                        help="classifier cache folder (default outputs/classifiers/<data.name>-<image_size>px)")
    defaults = ClassifierTrainConfig()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--max-train-images", type=int, default=defaults.max_train_images,
                        help="train on the first N train images (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", default=None,
                        help="score samples in an .npz (arr_0 uint8 [N, H, W, 3] + labels, as eval.gen_fid writes)")
    parser.add_argument("--sanity", action="store_true",
                        help="sanity figures on real val: FD/KID of one half vs the other and vs the other half "
                             "blurred (bicubic from S/4 thumbnails); accuracy of a 'generator' that ignores labels")
    parser.epilog = "Data options: --data.<field> value for every common.data.DataConfig field (e.g. --data.name glyphs)."
    args = parser.parse_args(rest)
    args.data_overrides = data_overrides
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data_cfg = load_data_config(args.data_overrides)
    train_cfg = ClassifierTrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                      max_train_images=args.max_train_images, seed=args.seed)
    folder = Path(args.output_dir) if args.output_dir else default_classifier_dir(data_cfg)
    classifier, metadata, trained = load_or_train_classifier(folder, data_cfg, train_cfg, device=args.device)
    print(f"classifier {'trained and cached' if trained else 'loaded'}: {folder}")
    print(f"data set {metadata['dataset']['name']} at {metadata['dataset']['image_size']} px, "
          f"{metadata['dataset']['num_classes']} classes, {metadata['num_train_images']} train images, "
          f"{metadata['training']['epochs']} epochs in {metadata['train_seconds']:.0f} s "
          f"({metadata['torch_threads']} threads)")
    print(f"accuracy on real val ({metadata['num_val_images']} images): {metadata['real_val_accuracy']:.4f}")
    result: dict[str, Any] = {"classifier": str(folder), "metadata": metadata}
    if args.sanity:
        result["sanity"] = sanity_figures(folder, classifier, metadata, data_cfg, device=args.device)
        for key, value in result["sanity"].items():
            print(f"sanity: {key} = {value:.4f}")
    if args.samples:
        with np.load(args.samples) as npz:
            if "arr_0" not in npz or "labels" not in npz:
                raise ValueError(f"{args.samples} must hold arr_0 (uint8 [N, H, W, 3]) and labels [N]")
            images = torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2).contiguous()
            labels = torch.from_numpy(npz["labels"]).long()
        val_images, _, _ = load_split(data_cfg, "val")
        report = classifier_report(folder, classifier, metadata, images, labels, val_images, device=args.device)
        print(f"samples ({report['classifier_protocol']['num_images']}): accuracy {report['classifier_accuracy']:.4f}, "
              f"{report['classifier_fd_name']} {report['classifier_fd']:.3f}, "
              f"{report['classifier_kid_name']} {report['classifier_kid_mean']:.4f} ± {report['classifier_kid_std']:.4f}")
        result["samples"] = report
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
