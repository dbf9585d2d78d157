"""Datasets that degrade ground-truth images on the fly (registered by ``import grl_plugin``)."""
from .base import GTImageDataset
from .noise_dataset import GaussianNoiseDataset

#: Dataset classes registered in BasicSR's DATASET_REGISTRY.
DATASETS = [GaussianNoiseDataset]

__all__ = ["DATASETS", "GTImageDataset", "GaussianNoiseDataset"]
