"""Datasets as in-memory arrays: see `base.ArrayDataset`."""
from ondevice.data.base import ArrayDataset
