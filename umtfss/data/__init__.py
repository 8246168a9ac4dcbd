"""Data sets: one reader per benchmark behind one interface, converters, the prepare stage, the demo."""

from umtfss.data.base import SegmentationDataset, open_dataset

__all__ = ["SegmentationDataset", "open_dataset"]
