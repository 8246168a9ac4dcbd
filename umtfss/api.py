"""The Python API: three small objects over the stages, each with one verb (in the manner of faiss.Kmeans)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["PixelEmbedder", "PixelClusters", "FewShotSegmenter"]


def _image(image: np.ndarray | str | Path) -> np.ndarray:
    """uint8 HxWx3 from an array or any image file umtfss reads."""
    from umtfss.io import read_rgb

    if isinstance(image, (str, Path)):
        return read_rgb(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image array has shape {array.shape} and dtype {array.dtype}, expected uint8 HxWx3 (RGB)")
    return array


class PixelEmbedder:
    """Per-pixel features of single images, exactly as `umtfss embed` stores them (resize-pad, backbone
    layer, optional projection, L2 norm), for a look at a few images without the workflow.

    `backbone` is a registry name (`umtfss.backbones.list_backbones()`) or a built FeatureBackbone;
    the expensive knobs are the input size and the device.
    """

    def __init__(self, backbone="resnet50-imagenet", *, layer: str | None = None, image_size: int = 473,
                 dim: int | None = None, checkpoint: str | Path | None = None, checkpoint_url: str | None = None,
                 checkpoint_sha256: str | None = None, output_stride: int = 8, device: str = "auto",
                 amp: bool = True, cpu_precision: str = "float32"):
        from umtfss.backbones import build_backbone
        from umtfss.devices import check_cpu_precision, lay_out_for_precision, resolve_device
        from umtfss.embedding import random_projection, resolve_layer

        if isinstance(backbone, str):
            backbone = build_backbone(backbone, checkpoint=checkpoint, checkpoint_url=checkpoint_url,
                                      checkpoint_sha256=checkpoint_sha256, output_stride=output_stride)
        self.cpu_precision = check_cpu_precision(cpu_precision, "cpu_precision")
        self.device = resolve_device(device, "device")
        self.backbone = lay_out_for_precision(backbone.to(self.device).eval(), self.device, cpu_precision, "embed")
        self.layer = resolve_layer(self.backbone, layer, "layer")
        self.stride = int(self.backbone.strides[self.layer])
        self.image_size = int(image_size)
        self.amp = amp
        channels = int(self.backbone.channels[self.layer])
        projection = random_projection(channels, dim) if dim is not None and dim != channels else None
        self.projection = projection.to(self.device) if projection is not None else None
        self.dim = channels if projection is None else int(dim)

    def embed(self, image: np.ndarray | str | Path) -> np.ndarray:
        """float32 [rows, cols, dim] features of the grid cells that cover the image (padding cut off),
        each of unit length: the image's cells of an embedding store."""
        from umtfss.embedding import _valid_cells, pixel_features
        from umtfss.transforms import resize_pad

        tensor, _, extent = resize_pad(_image(image), None, self.image_size)
        features = pixel_features(self.backbone, self.layer, tensor[None].to(self.device), self.projection,
                                  self.amp, self.cpu_precision)[0]
        rows, cols = _valid_cells(extent, self.stride, tuple(features.shape[:2]))
        return features[:rows, :cols].cpu().numpy()


class PixelClusters:
    """k-means of pixel features into pseudo classes (paper Eq. 3-4): `train` on embedding stores (a
    random subset of their pixels, all of it used) or on an array of points, then `search` features
    or `assign` a whole store. The same fit and search as `umtfss fit` / `umtfss assign`.
    """

    def __init__(self, clusters: int = 50, *, subset_pixels: int = 1_000_000, iterations: int = 20, redo: int = 1,
                 seed: int = 0, metric: str = "spherical", device: str = "auto", backend: str = "auto"):
        self.clusters, self.subset_pixels, self.iterations, self.redo = int(clusters), subset_pixels, iterations, redo
        self.seed, self.metric, self.device, self.backend = seed, metric, device, backend
        self.centroids: np.ndarray | None = None
        self.meta: dict = {}

    def train(self, embeddings, *, progress: bool = True) -> "PixelClusters":
        """Fit the centroids: `embeddings` is an embedding store (path, list of shard paths or
        EmbeddingStore; a progress bar while its pixels are sampled) or a float [n, C] array of points,
        clustered whole."""
        from umtfss.clustering.fit import METRICS, choose_backend, fit_centroids, train_kmeans
        from umtfss.clustering.assign import normalise_rows

        if not isinstance(embeddings, np.ndarray):
            paths = [embeddings] if isinstance(embeddings, (str, Path)) else embeddings
            self.centroids, self.meta = fit_centroids(
                paths, self.clusters, self.subset_pixels, self.iterations, self.redo, self.seed, device=self.device,
                backend=self.backend, progress=progress, metric=self.metric)
            return self
        if self.metric not in METRICS:
            raise ValueError(f"metric is '{self.metric}', expected one of {', '.join(METRICS)}")
        if embeddings.ndim != 2:
            raise ValueError(f"points have shape {embeddings.shape}, expected [n, channels]")
        points = np.ascontiguousarray(embeddings, dtype=np.float32)
        backend, device = choose_backend(self.backend, self.device)
        spherical = self.metric == "spherical"
        kmeans = train_kmeans(points, self.clusters, self.iterations, self.redo, self.seed, backend=backend,
                              device=device, spherical=spherical)
        centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        self.centroids = normalise_rows(centroids) if spherical else centroids
        self.meta = {"clusters": self.clusters, "metric": self.metric, "subset_pixels": len(points),
                     "dim": int(points.shape[1]), "iterations": self.iterations, "redo": self.redo, "seed": self.seed,
                     "objective": [float(v) for v in kmeans.obj], "backend": backend, "device": device}
        return self

    def _trained(self) -> np.ndarray:
        if self.centroids is None:
            raise ValueError("PixelClusters has no centroids yet: call train() or PixelClusters.load(centroids.npy)")
        return self.centroids

    def search(self, features: np.ndarray) -> np.ndarray:
        """int16 [...] nearest-centroid id of [..., C] features (largest cosine for spherical centroids,
        smallest L2 distance for euclidean ones), as `umtfss assign` labels a store's cells."""
        from umtfss.clustering.assign import nearest_centroid
        from umtfss.devices import resolve_device

        centroids = self._trained()
        features = np.asarray(features)
        if features.shape[-1] != centroids.shape[1]:
            raise ValueError(f"features have {features.shape[-1]} channels, the centroids {centroids.shape[1]}")
        tensor = torch.from_numpy(centroids).to(resolve_device(self.device, "device"))
        if tensor.device.type == "cuda" and features.dtype == np.float16:
            tensor = tensor.half()
        return nearest_centroid(features, tensor)

    def assign(self, embedding_shard: str | Path, out: str | Path, *, batch_images: int = 32,
               progress: bool = True) -> Path:
        """Write the label store of one embedding shard (streamed: memory bounded by a batch)."""
        from umtfss.clustering.assign import assign_shard

        return assign_shard(embedding_shard, self._trained(), out, batch_images=batch_images, device=self.device,
                            progress=progress, fit_meta=self.meta)  # refuses a shard of other embeddings

    def save(self, centroids_path: str | Path, meta_path: str | Path | None = None) -> None:
        """centroids.npy and its fit.json (default: beside it), each written atomically."""
        from umtfss.clustering.fit import write_fit

        centroids_path = Path(centroids_path)
        write_fit(self._trained(), self.meta, centroids_path, meta_path or centroids_path.with_name("fit.json"))

    @classmethod
    def load(cls, centroids_path: str | Path, *, device: str = "auto") -> "PixelClusters":
        """A trained PixelClusters from centroids.npy (and the fit.json beside it, when there is one)."""
        from umtfss.clustering.assign import l2_offsets, load_centroids

        centroids = load_centroids(centroids_path)
        meta_path = Path(centroids_path).with_name("fit.json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        metric = meta.get("metric") or ("euclidean" if l2_offsets(torch.from_numpy(centroids)) is not None
                                        else "spherical")
        clusters = cls(len(centroids), metric=metric, device=device)
        clusters.centroids, clusters.meta = centroids, meta
        return clusters


class FewShotSegmenter:
    """A trained FSS model: `segment` a query image from K (image, mask) supports, as `umtfss predict` does.

    Masks may be 0/1, 0/255 or 0/1/255 (255 = ignore) arrays or mask files.
    """

    def __init__(self, model: torch.nn.Module, size: int, device: str = "auto", cpu_precision: str = "float32"):
        from umtfss.devices import check_cpu_precision, lay_out_for_precision, resolve_device

        from umtfss.predict import MAX_SIZE, MIN_SIZE

        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(f"size is {size}, expected {MIN_SIZE} to {MAX_SIZE} (pixels of the longer side)")
        self.cpu_precision = check_cpu_precision(cpu_precision, "cpu_precision")
        self.device = resolve_device(device, "device")
        self.model = lay_out_for_precision(model.to(self.device).eval(), self.device, cpu_precision, "predict")
        self.size = int(size)

    @classmethod
    def load(cls, checkpoint: str | Path, *, size: int | None = None, device: str = "auto",
             cpu_precision: str = "float32", backbone_checkpoint: str | Path | None = None) -> "FewShotSegmenter":
        """The model of a `umtfss train` checkpoint; `size` defaults to the test size it was configured with,
        else (a workflow checkpoint, trained without the evaluation section) the crop it was trained at.
        `backbone_checkpoint`: the frozen backbone's weights file, when the one recorded at training is not here."""
        from umtfss.training.checkpoint import load, load_model, test_size

        size = size or test_size(load(checkpoint))[0]
        return cls(load_model(checkpoint, "cpu", backbone_checkpoint), size, device, cpu_precision)

    def segment(self, query, supports: Sequence[tuple], support_class: int | None = None) -> np.ndarray:
        """uint8 0/1 foreground mask at the query's own size."""
        return self.segment_many([query], supports, support_class)[0]

    def segment_many(self, queries: Sequence, supports: Sequence[tuple],
                     support_class: int | None = None) -> list[np.ndarray]:
        """One mask per query, the supports shared, in one forward pass. `support_class`: the masks hold
        class indices and this class is the foreground (as `umtfss predict --support-class`)."""
        from umtfss.predict import as_support_mask, check_support, predict_masks, read_support_mask, support_tensors

        if not supports:
            raise ValueError("no support: give at least one (image, mask) pair")
        pairs = []
        for number, (image, mask) in enumerate(supports):
            name = str(mask) if isinstance(mask, (str, Path)) else f"#{number}"
            mask = (read_support_mask(mask, support_class) if isinstance(mask, (str, Path))
                    else as_support_mask(mask, support_class))
            image = _image(image)
            check_support(image, mask, f"#{number}", name, support_class)
            pairs.append((image, mask))
        torch.manual_seed(0)  # a model that draws at inference (model.hash_draw per_call) predicts the same each call
        return predict_masks(self.model, [_image(q) for q in queries], *support_tensors(pairs, self.size), self.size,
                             self.device, self.cpu_precision)
