"""umtfss: few-shot semantic segmentation meta-trained on unlabeled images."""

__version__ = "0.1.0"
