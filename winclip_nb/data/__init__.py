"""Data: image decoding, datasets (MVTec-AD, VisA, folders), the synthetic set, safe files
and memory-bank files. Everything the pipeline reads or writes on disk lives here."""

from __future__ import annotations

from .datasets import (
    GOOD,
    LABEL_DEFECTIVE,
    LABEL_GOOD,
    LABEL_UNKNOWN,
    MVTEC_CLASSES,
    SYNTHETIC_CLASSES,
    SYNTHETIC_DEFECTS,
    VISA_CLASSES,
    VISA_GROUPS,
    ClassData,
    TestSample,
    class_kind,
    list_mvtec_classes,
    list_visa_classes,
    load_folder_dataset,
    load_mvtec_class,
    load_visa_class,
    sample_k_shot,
)
from .files import atomic_write, file_lock, safe_name
from .images import DataWarning, list_images, load_image, load_mask
from .render import render_synthetic_image, synthetic_image_seed
from .synthetic import (
    default_synthetic_root,
    default_synthetic_visa_root,
    is_synthetic_root,
    make_synthetic_mvtec,
    make_synthetic_visa,
)

__all__ = [
    "GOOD",
    "LABEL_DEFECTIVE",
    "LABEL_GOOD",
    "LABEL_UNKNOWN",
    "MVTEC_CLASSES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_DEFECTS",
    "VISA_CLASSES",
    "VISA_GROUPS",
    "ClassData",
    "DataWarning",
    "TestSample",
    "atomic_write",
    "class_kind",
    "default_synthetic_root",
    "default_synthetic_visa_root",
    "file_lock",
    "is_synthetic_root",
    "list_images",
    "list_mvtec_classes",
    "list_visa_classes",
    "load_folder_dataset",
    "load_image",
    "load_mask",
    "load_mvtec_class",
    "load_visa_class",
    "make_synthetic_mvtec",
    "make_synthetic_visa",
    "render_synthetic_image",
    "safe_name",
    "sample_k_shot",
    "synthetic_image_seed",
]
