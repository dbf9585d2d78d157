"""Datasets that degrade ground-truth images on the fly (registered by ``import grl_plugin``)."""
from .base import GTImageDataset
from .noise_dataset import GaussianNoiseDataset
from .jpeg_dataset import JPEGDataset
from .demosaic_dataset import DemosaicDataset
from .dual_pixel_dataset import DualPixelDataset

#: Dataset classes registered in BasicSR's DATASET_REGISTRY.
DATASETS = [GaussianNoiseDataset, JPEGDataset, DemosaicDataset, DualPixelDataset]

__all__ = ["DATASETS", "GTImageDataset", "GaussianNoiseDataset", "JPEGDataset", "DemosaicDataset",
           "DualPixelDataset"]
