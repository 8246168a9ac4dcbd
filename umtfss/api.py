"""The Python API: three small objects over the stages, each with one verb (in the manner of faiss.Kmeans)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["PixelEmbedder", "PixelClusters", "FewShotSegmenter"]


def _image(image: np.ndarray | str | Path) -> np.ndarray:
    """uint8 HxWx3 from an array or any image file umtfss reads."""
    from umtfss.io import read_rgb

    if isinstance(image, (str, os.PathLike)):
        return read_rgb(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image array has shape {array.shape} and dtype {array.dtype}, expected uint8 HxWx3 (RGB)")
    if 0 in array.shape:
        raise ValueError(f"image array has shape {array.shape}, expected at least one pixel")
    return array


def _integer(value, name: str, low: int, high: int | None = None, unit: str = "") -> int:
    """`value` as an int within [low, high]; a float or bool is refused rather than silently cut."""
    unit = f" ({unit})" if unit else ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} is {value!r}, expected an integer{unit}")
    if value < low or (high is not None and value > high):
        expected = f"{low} to {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} is {value}, expected {expected}{unit}")
    return int(value)


def _finite(array: np.ndarray, what: str) -> None:
    """Refuse NaN or inf: k-means and argmax turn them silently into NaN centroids or label 0.
    The float64 sum is non-finite exactly when some element is (no copy of the array)."""
    if not np.isfinite(np.sum(array, dtype=np.float64)):
        raise ValueError(f"{what} hold non-finite values (NaN or inf)")


MAX_CLUSTERS = int(np.iinfo(np.int16).max)  # labels are int16, as in the label stores


class PixelEmbedder:
    """Per-pixel features of single images, exactly as `umtfss embed` stores them (resize-pad, backbone
    layer, optional projection, L2 norm), for a look at a few images without the workflow.

    `backbone` is a registry name (`umtfss.backbones.list_backbones()`) or a built FeatureBackbone;
    the expensive knobs are the input size and the device. `dtype` is the store's embedding.dtype:
    the workflow stores float16 by default, and its rounding can move a cell to another cluster.
    """

    def __init__(self, backbone="resnet50-imagenet", *, layer: str | None = None, image_size: int = 473,
                 dim: int | None = None, checkpoint: str | Path | None = None, checkpoint_url: str | None = None,
                 checkpoint_sha256: str | None = None, output_stride: int = 8, device: str = "auto",
                 amp: bool = True, cpu_precision: str = "float32", dtype: str = "float32"):
        from umtfss.backbones import build_backbone
        from umtfss.devices import check_cpu_precision, lay_out_for_precision, resolve_device
        from umtfss.embedding import random_projection, resolve_layer
        from umtfss.predict import MIN_SIZE

        self.image_size = _integer(image_size, "image_size", MIN_SIZE)  # embedding.image_size's minimum
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype is {dtype!r}, expected float16 or float32 (embedding.dtype)")
        self.dtype = np.dtype(dtype)
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, checkpoint=checkpoint, checkpoint_url=checkpoint_url,
                                      checkpoint_sha256=checkpoint_sha256, output_stride=output_stride)
        elif checkpoint is not None or checkpoint_url is not None or checkpoint_sha256 is not None:
            raise ValueError("checkpoint, checkpoint_url and checkpoint_sha256 apply to a backbone name; the "
                             "backbone given is already built (with its own weights)")
        self.cpu_precision = check_cpu_precision(cpu_precision, "cpu_precision")
        self.device = resolve_device(device, "device")
        self.backbone = lay_out_for_precision(backbone.to(self.device).eval(), self.device, cpu_precision, "embed")
        self.layer = resolve_layer(self.backbone, layer, "layer")
        self.stride = int(self.backbone.strides[self.layer])
        self.amp = amp
        channels = int(self.backbone.channels[self.layer])
        if dim is not None:
            dim = _integer(dim, "dim", 1, channels, f"layer '{self.layer}' has {channels} channels")
        projection = random_projection(channels, dim) if dim is not None and dim != channels else None
        self.projection = projection.to(self.device) if projection is not None else None
        self.dim = channels if projection is None else int(dim)

    def embed(self, image: np.ndarray | str | Path) -> np.ndarray:
        """`dtype` [rows, cols, dim] features of the grid cells that cover the image (padding cut off),
        each of unit length, C-contiguous: the image's cells of an embedding store of that dtype."""
        from umtfss.embedding import _valid_cells, pixel_features
        from umtfss.transforms import resize_pad

        tensor, _, extent = resize_pad(_image(image), None, self.image_size)
        features = pixel_features(self.backbone, self.layer, tensor[None].to(self.device), self.projection,
                                  self.amp, self.cpu_precision)[0]
        rows, cols = _valid_cells(extent, self.stride, tuple(features.shape[:2]))
        stored = features[:rows, :cols].to(getattr(torch, self.dtype.name))  # rounded as embed_shard rounds
        return np.ascontiguousarray(stored.cpu().numpy())


class PixelClusters:
    """k-means of pixel features into pseudo classes (paper Eq. 3-4): `train` on embedding stores (a
    random subset of their pixels, all of it used) or on an array of points, then `search` features
    or `assign` a whole store. The same fit and search as `umtfss fit` / `umtfss assign`.
    """

    def __init__(self, clusters: int = 50, *, subset_pixels: int = 1_000_000, iterations: int = 20, redo: int = 1,
                 seed: int = 0, metric: str = "spherical", device: str = "auto", backend: str = "auto"):
        from umtfss.clustering.fit import METRICS

        if metric not in METRICS:
            raise ValueError(f"metric is {metric!r}, expected one of {', '.join(METRICS)}")
        self.clusters = _integer(clusters, "clusters", 1, MAX_CLUSTERS)
        self.subset_pixels = _integer(subset_pixels, "subset_pixels", 1)
        self.iterations = _integer(iterations, "iterations", 1)
        self.redo = _integer(redo, "redo", 1)
        self.seed = _integer(seed, "seed", 0)
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend is {backend!r}, expected auto, faiss or torch")
        from umtfss.devices import resolve_device

        resolve_device(device, "device")  # a bad name fails here, not as a clustering.device at train()
        self.metric, self.device, self.backend = metric, device, backend
        self.centroids: np.ndarray | None = None
        self.meta: dict = {}

    def train(self, embeddings, *, progress: bool = True) -> "PixelClusters":
        """Fit the centroids: `embeddings` is an embedding store (path, list of shard paths or
        EmbeddingStore; a progress bar while its pixels are sampled) or a float [n, C] array (or tensor)
        of points, clustered whole. Spherical k-means clusters the points' directions (rows are
        L2-normalised first, as `umtfss fit` does with a store's pixels); euclidean clusters them as given."""
        from umtfss.clustering.fit import choose_backend, fit_centroids, train_kmeans
        from umtfss.clustering.assign import normalise_rows
        from umtfss.stores import array_sha256

        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().cpu().numpy()
        elif (isinstance(embeddings, (list, tuple)) and embeddings
              and not all(isinstance(p, (str, os.PathLike)) for p in embeddings)):
            embeddings = np.asarray(embeddings)  # nested lists of numbers, not shard paths
        if not isinstance(embeddings, np.ndarray):
            paths = [embeddings] if isinstance(embeddings, (str, os.PathLike)) else embeddings
            self.centroids, self.meta = fit_centroids(
                paths, self.clusters, self.subset_pixels, self.iterations, self.redo, self.seed, device=self.device,
                backend=self.backend, progress=progress, metric=self.metric)
            return self
        if embeddings.ndim != 2 or embeddings.shape[1] < 1:
            raise ValueError(f"points have shape {embeddings.shape}, expected [n, channels]")
        if not (np.issubdtype(embeddings.dtype, np.floating) or np.issubdtype(embeddings.dtype, np.integer)):
            raise ValueError(f"points have dtype {embeddings.dtype}, expected a float (or integer) array")
        if len(embeddings) < self.clusters:
            raise ValueError(f"points have {len(embeddings)} rows, fewer than clusters ({self.clusters}); "
                             "k-means needs at least one point per cluster")
        _finite(embeddings, "points")
        spherical = self.metric == "spherical"
        points = np.array(embeddings, dtype=np.float32, order="C", copy=True)  # normalised in place: never the caller's
        if spherical:
            normalise_rows(points)
        backend, device = choose_backend(self.backend, self.device)
        kmeans = train_kmeans(points, self.clusters, self.iterations, self.redo, self.seed, backend=backend,
                              device=device, spherical=spherical)
        centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        self.centroids = normalise_rows(centroids) if spherical else centroids
        self.meta = {"clusters": self.clusters, "metric": self.metric, "subset_pixels": len(points),
                     "dim": int(points.shape[1]), "iterations": self.iterations, "redo": self.redo, "seed": self.seed,
                     "objective": [float(v) for v in kmeans.obj], "backend": backend, "device": device,
                     "centroids_sha256": array_sha256(self.centroids)}  # lets load() and assign tell its fit.json
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
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        features = np.asarray(features)
        if features.ndim < 1:
            raise ValueError(f"features have shape {features.shape}, expected [..., channels]")
        if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
            raise ValueError(f"features have dtype {features.dtype}, expected a float array (float16/32/64)")
        if features.shape[-1] != centroids.shape[1]:
            raise ValueError(f"features have {features.shape[-1]} channels, the centroids {centroids.shape[1]}")
        _finite(features, "features")
        tensor = torch.from_numpy(centroids).to(resolve_device(self.device, "device"))
        if tensor.device.type == "cuda" and features.dtype == np.float16:
            tensor = tensor.half()
        return nearest_centroid(features, tensor)

    def assign(self, embedding_shard: str | Path, out: str | Path, *, batch_images: int = 32,
               progress: bool = True) -> Path:
        """Write the label store of one embedding shard (streamed: memory bounded by a batch)."""
        from umtfss.clustering.assign import assign_shard
        from umtfss.io import check_outputs_apart

        check_outputs_apart({"out": out}, {"embedding_shard": [embedding_shard]})  # as `umtfss assign`: no overwrite
        return assign_shard(embedding_shard, self._trained(), out, batch_images=batch_images, device=self.device,
                            progress=progress, fit_meta=self.meta)  # refuses a shard of other embeddings

    def save(self, centroids_path: str | Path, meta_path: str | Path | None = None) -> None:
        """centroids.npy and its fit.json (default: beside it), each written atomically."""
        from umtfss.clustering.fit import write_fit
        from umtfss.io import check_outputs_apart

        centroids_path = Path(centroids_path)
        meta_path = meta_path or centroids_path.with_name("fit.json")
        check_outputs_apart({"centroids_path": centroids_path, "meta_path": meta_path}, {})  # else fit.json over the .npy
        write_fit(self._trained(), self.meta, centroids_path, meta_path)

    @classmethod
    def load(cls, centroids_path: str | Path, *, device: str = "auto") -> "PixelClusters":
        """A trained PixelClusters from centroids.npy and the fit.json beside it when that describes these
        centroids (by their sha256, as `umtfss assign` reads it): a stale or unreadable one is left out."""
        from umtfss.clustering.assign import fit_record, l2_offsets, load_centroids

        centroids = load_centroids(centroids_path)
        if len(centroids) > MAX_CLUSTERS:
            raise ValueError(f"centroids file '{centroids_path}' has {len(centroids)} centroids, more than the "
                             f"{MAX_CLUSTERS} int16 labels hold")
        record = fit_record(centroids_path, centroids)
        meta = record[0] if record is not None else {}
        metric = meta.get("metric") or ("euclidean" if l2_offsets(torch.from_numpy(centroids)) is not None
                                        else "spherical")
        knobs = {key: meta[key] for key in ("iterations", "redo", "seed") if isinstance(meta.get(key), int)}
        if isinstance(meta.get("subset_pixels_requested"), int):
            knobs["subset_pixels"] = meta["subset_pixels_requested"]
        clusters = cls(len(centroids), metric=metric, device=device, **knobs)  # the fit's knobs, for a train() again
        clusters.centroids, clusters.meta = centroids, meta
        return clusters


class FewShotSegmenter:
    """A trained FSS model: `segment` a query image from K (image, mask) supports, as `umtfss predict` does.

    Masks may be 0/1, 0/255 or 0/1/255 (255 = ignore) HxW arrays or mask files.
    """

    def __init__(self, model: torch.nn.Module, size: int, device: str = "auto", cpu_precision: str = "float32"):
        from umtfss.devices import check_cpu_precision, lay_out_for_precision, resolve_device

        from umtfss.predict import MAX_SIZE, MIN_SIZE

        self.size = _integer(size, "size", MIN_SIZE, MAX_SIZE, "pixels of the longer side")
        self.cpu_precision = check_cpu_precision(cpu_precision, "cpu_precision")
        self.device = resolve_device(device, "device")
        self.model = lay_out_for_precision(model.to(self.device).eval(), self.device, cpu_precision, "predict")

    @classmethod
    def load(cls, checkpoint: str | Path, *, size: int | None = None, device: str = "auto",
             cpu_precision: str = "float32", backbone_checkpoint: str | Path | None = None) -> "FewShotSegmenter":
        """The model of a `umtfss train` checkpoint; `size` defaults to the test size it was configured with,
        else (a workflow checkpoint, trained without the evaluation section) the crop it was trained at.
        `backbone_checkpoint`: the frozen backbone's weights file, when the one recorded at training is not here."""
        from umtfss.training.checkpoint import load, load_model, test_size

        size = size if size is not None else test_size(load(checkpoint))[0]  # 0 is refused, not the default
        return cls(load_model(checkpoint, "cpu", backbone_checkpoint), size, device, cpu_precision)

    def segment(self, query, supports: Sequence[tuple], support_class: int | None = None) -> np.ndarray:
        """uint8 0/1 foreground mask at the query's own size."""
        return self.segment_many([query], supports, support_class)[0]

    def _support_mask(self, mask, name: str, support_class: int | None) -> np.ndarray:
        """0/1/255 uint8 of a mask file or HxW array; a note (as predict's) for class indices merged."""
        from umtfss.predict import as_support_mask, class_index_note, read_support_mask

        def note(line: str) -> None:
            warnings.warn(line.replace("--support-class K", "support_class=K"), stacklevel=4)

        if isinstance(mask, (str, os.PathLike)):
            return read_support_mask(mask, support_class, note)
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().numpy()
        values = np.asarray(mask)
        if values.ndim != 2:
            raise ValueError(f"support mask {name} has shape {values.shape}, expected an HxW array (a colour "
                             "mask: reduce it first, e.g. mask.max(axis=2), as mask files are read)")
        if values.dtype.kind not in "biuf":
            raise ValueError(f"support mask {name} has dtype {values.dtype}, expected integers or bool")
        if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
            raise ValueError(f"support mask {name} holds fractional values (e.g. a soft mask); expected "
                             "0/1, 0/255 or class indices: threshold it first")
        if support_class is None and (line := class_index_note(name, values)):
            note(line)
        return as_support_mask(values, support_class)

    def segment_many(self, queries: Sequence, supports: Sequence[tuple],
                     support_class: int | None = None, *, batch: int = 8) -> list[np.ndarray]:
        """One mask per query, the supports shared, `batch` queries per forward pass (memory grows with it;
        `umtfss predict --batch`, same default). `support_class`: the masks hold class indices and this class
        is the foreground (as `umtfss predict --support-class`). The global torch RNG is left as it was (the
        model is seeded for each call, as predict seeds each run)."""
        from umtfss.devices import channels_last_input, inference_autocast
        from umtfss.evaluation.feature_cache import takes_features
        from umtfss.predict import backbone_features, check_support, predict_masks, support_tensors

        if isinstance(queries, (str, os.PathLike)) or (isinstance(queries, np.ndarray) and queries.ndim == 3):
            raise ValueError("queries is one image; give a list of images (or call segment())")
        batch = _integer(batch, "batch", 1, unit="queries per forward pass")
        queries = [_image(q) for q in queries]
        if not queries:
            raise ValueError("no query: give at least one image")
        if support_class is not None:
            support_class = _integer(support_class, "support_class", 1, 254)
        supports = list(supports)
        if not supports:
            raise ValueError("no support: give at least one (image, mask) pair")
        pairs = []
        for number, support in enumerate(supports):
            if not _is_pair(support):
                raise ValueError(f"support #{number} is a {type(support).__name__}, expected an (image, mask) pair: "
                                 "supports is a list of them, [(image, mask)] for one")
            image, mask = support
            name = f"'{mask}'" if isinstance(mask, (str, os.PathLike)) else f"#{number}"
            mask = self._support_mask(mask, name, support_class)
            image = _image(image)
            check_support(image, mask, f"#{number}", name, support_class)
            pairs.append((image, mask))
        images, masks = support_tensors(pairs, self.size)
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)  # a model that draws at inference (model.hash_draw per_call) predicts the same each call
            shared = None
            if takes_features(self.model):  # the supports' features as predict computes them (its input layout)
                with inference_autocast(self.device, False, self.cpu_precision):
                    shared = backbone_features(self.model, channels_last_input(images.to(self.device),
                                                                               self.cpu_precision))
            return [mask for start in range(0, len(queries), batch)
                    for mask in predict_masks(self.model, queries[start:start + batch], images, masks, self.size,
                                              self.device, self.cpu_precision, shared)]


def _is_pair(support) -> bool:
    """Whether `support` is a tuple or list of two (an image and its mask, each checked later)."""
    return isinstance(support, (tuple, list)) and len(support) == 2
