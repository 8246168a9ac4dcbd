"""umtfss: few-shot semantic segmentation meta-trained on unlabeled images."""

__version__ = "0.1.0"

_API = ("PixelEmbedder", "PixelClusters", "FewShotSegmenter")


def __getattr__(name):
    # `from umtfss import PixelClusters` without importing torch for every `umtfss` command
    if name in _API:
        from umtfss import api

        return getattr(api, name)
    raise AttributeError(f"module 'umtfss' has no attribute '{name}'")
