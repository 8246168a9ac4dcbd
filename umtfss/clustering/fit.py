"""The fit stage: k-means centroids (paper Eq. 3) on a uniform random subset of the valid embedded pixels."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from umtfss.clustering.assign import nearest_centroid, normalise_rows
from umtfss.clustering.minibatch import image_groups, running_means
from umtfss.clustering.torch_kmeans import TorchKMeans
from umtfss.devices import resolve_device
from umtfss.io import atomic_path, check_output_paths, check_outputs_apart
from umtfss.stores import EMBEDDING_ATTRS, READ_BATCH_IMAGES, EmbeddingStore, array_sha256, iter_selected
from umtfss.progress import tqdm


def faiss_gpu(device: str) -> bool:
    """Whether to train on a GPU: 'auto' -> when faiss sees one; 'cpu' -> no; 'cuda*' -> yes, or a clear error."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "auto":
        return gpus > 0
    if device == "cpu":
        return False
    if device.startswith("cuda"):
        if gpus == 0:
            raise ValueError(f"config key 'clustering.device' is '{device}' but faiss sees no GPU "
                             "(replace faiss-cpu by faiss-gpu, README 'Real data'; or use 'auto'/'cpu', or 'clustering.backend: torch')")
        return True
    raise ValueError(f"config key 'clustering.device' is '{device}', expected auto, cpu, cuda or cuda:N")


def choose_backend(backend: str, device: str) -> tuple[str, str]:
    """(backend, device) that train the k-means: faiss on its GPU or CPU, or torch on a CUDA device.

    'auto' prefers faiss when it can use the requested device; a GPU that only torch sees (PyPI's
    faiss-cpu on a GPU machine) is used through TorchKMeans rather than left idle.
    """
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"config key 'clustering.backend' is '{backend}', expected auto, faiss or torch")
    if backend == "torch":
        return "torch", str(resolve_device(device, "clustering.device"))
    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if backend == "faiss" or faiss_gpus > 0 or device == "cpu":
        return "faiss", "cuda" if faiss_gpu(device) else "cpu"
    torch_device = resolve_device(device, "clustering.device")
    return ("torch", str(torch_device)) if torch_device.type == "cuda" else ("faiss", "cpu")


def sample_pixels(store: EmbeddingStore, subset_pixels: int, seed: int, progress: bool = False,
                  images: np.ndarray | None = None) -> np.ndarray:
    """A uniform random subset (without replacement) of the valid pixels of all images, float32 [n, C].

    The global pixel indices are drawn first (seeded), so every image contributes in proportion to its
    valid area; images are then streamed one batch at a time and only the drawn pixels are kept, so
    memory is bounded by the subset, not the data set. All valid pixels are taken when there are
    fewer than `subset_pixels`. Rows are L2-normalised again (the stored float16 rounding is undone).
    `images` (sorted image indices) limits the draw to those images (the mini-batch fit's first group).
    """
    images = np.arange(len(store)) if images is None else np.asarray(images, np.int64)
    valid = store.valid_all[images].astype(np.int64)
    per_image = valid[:, 0] * valid[:, 1]
    offsets = np.concatenate([[0], np.cumsum(per_image)])
    total = int(offsets[-1])
    if total == 0:
        raise ValueError(f"embedding stores {', '.join(map(str, store.paths))} hold no valid pixel")
    rng = np.random.default_rng(seed)
    take = min(subset_pixels, total)
    chosen = np.sort(rng.choice(total, size=take, replace=False)) if take < total else np.arange(total)
    bounds = np.searchsorted(chosen, offsets)  # chosen[bounds[i]:bounds[i+1]] fall in image i
    subset = np.empty((take, store.dim), np.float32)
    filled = 0
    bar = tqdm(total=len(images), desc="sample pixels", unit="img", file=sys.stderr, disable=not progress)
    index = 0  # position in `images`: the batches come in its order
    for indices, block, block_valid in iter_selected(store, images, READ_BATCH_IMAGES):
        for row in range(len(indices)):
            picks = chosen[bounds[index]:bounds[index + 1]] - offsets[index]
            index += 1
            if len(picks) == 0:
                continue
            rows, cols = block_valid[row]
            cells = block[row, :rows, :cols].reshape(-1, store.dim)
            subset[filled:filled + len(picks)] = cells[picks]
            filled += len(picks)
        bar.update(len(indices))
    bar.close()
    assert filled == take, (filled, take)
    return normalise_rows(subset)


def train_kmeans(points: np.ndarray, clusters: int, iterations: int, redo: int, seed: int,
                 backend: str = "faiss", device: str = "cpu", spherical: bool = True,
                 init_centroids: np.ndarray | None = None, progress: bool = False) -> faiss.Kmeans | TorchKMeans:
    """k-means on ALL of `points`: faiss (max_points_per_centroid raised so it does not subsample) or torch,
    on `device` as choose_backend gives it ('cpu', or a GPU: faiss's own or torch's).

    `progress`: a line on stderr before the training (fit's longest step: 6-13 s for 10^6 x 256 points
    on 2 cores, more with more clusters or restarts), and for torch a bar over its iterations; faiss's
    loop offers no hook short of its own printing to stdout.
    """
    n, d = points.shape
    if n < clusters:
        raise ValueError(f"only {n} pixels to fit {clusters} clusters; lower 'clustering.clusters' "
                         "or raise 'clustering.subset_pixels' / embed more images")
    if progress:
        print(f"k-means: {n:,} points x {d} channels into {clusters} clusters, up to {iterations} iteration(s)"
              f"{f' x {redo} restarts' if redo > 1 else ''} ({backend} on {device})", file=sys.stderr, flush=True)
    if backend == "torch":
        return TorchKMeans(d, clusters, niter=iterations, nredo=redo, spherical=spherical, seed=seed,
                           device=device, progress=progress).train(points, init_centroids=init_centroids)
    kmeans = faiss.Kmeans(d, clusters, niter=iterations, nredo=redo, spherical=spherical, seed=seed,
                          max_points_per_centroid=math.ceil(n / clusters) + 1, min_points_per_centroid=1,
                          gpu=device != "cpu", verbose=False)
    kmeans.train(points, init_centroids=init_centroids)
    return kmeans


def too_few_pixels(pixels: int, clusters: int, subset_pixels: int, groups) -> str:
    """Why the subset is smaller than the cluster count, naming the key that would help."""
    if groups is not None:
        return (f"the first mini-batch group ({len(groups.first)} image(s)) has only {pixels} valid pixels to fit "
                f"{clusters} clusters; raise 'clustering.minibatch_images' or lower 'clustering.clusters'")
    if pixels < subset_pixels:
        return (f"the embedding stores hold only {pixels} valid pixels to fit {clusters} clusters; "
                "lower 'clustering.clusters' or embed more images")
    return (f"'clustering.subset_pixels' is {subset_pixels}, fewer than 'clustering.clusters' ({clusters}); "
            "raise it or lower the cluster count")


SIZE_BLOCK_ELEMENTS = 2 ** 24  # scores per block of cluster_sizes: block rows x N (64 MB of float32)
EMPTY_IDS_RECORDED = 100  # fit.json lists at most this many empty cluster ids


def cluster_sizes(points: np.ndarray, centroids: np.ndarray, device: str = "cpu") -> np.ndarray:
    """int64 [N] points nearest to each centroid, by assign's own rule (nearest_centroid), in row blocks.

    The k-means' last assignment is to the centroids before their last update (and before empty
    clusters were split off large ones), so it cannot tell which final centroids assign will leave empty.
    """
    scoring = torch.device(device if device.startswith("cuda") and torch.cuda.is_available() else "cpu")
    tensor = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(scoring)
    rows = max(1, SIZE_BLOCK_ELEMENTS // len(centroids))
    sizes = np.zeros(len(centroids), np.int64)
    for start in range(0, len(points), rows):
        nearest = nearest_centroid(points[start:start + rows], tensor).astype(np.int64)
        sizes += np.bincount(nearest, minlength=len(centroids))
    return sizes


def distinct_rows(points: np.ndarray, block_rows: int = 65536) -> int:
    """How many distinct rows `points` holds, from their float64 projections on a fixed random direction
    (distinct float32 rows collide there with probability ~0): O(n d), no n x d copy."""
    direction = np.random.default_rng(0).standard_normal(points.shape[1])
    projections = np.empty(len(points))
    for start in range(0, len(points), block_rows):
        projections[start:start + block_rows] = points[start:start + block_rows].astype(np.float64) @ direction
    return int(np.unique(projections).size)


def empty_cluster_warning(empty: np.ndarray, clusters: int, subset: int, distinct: int) -> str:
    """The stderr line for clusters no point was nearest to: the likely cause and the key to change."""
    ids = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
    cause = (f"the subset holds only {distinct:,} distinct points" if distinct < clusters
             else "the features are nearly constant (near-duplicate points)")
    return (f"umtfss fit: warning: {len(empty)} of the {clusters} clusters (config key 'clustering.clusters') are "
            f"nearest to no pixel of the {subset:,}-pixel subset (ids {ids}): {cause}, so k-means made "
            "near-duplicate centroids that assign leaves empty; lower 'clustering.clusters' or check the embedding "
            "(backbone, layer, images)")


METRICS = ("spherical", "euclidean")
LABEL_MAX = int(np.iinfo(np.int16).max)
FIT_MODES = ("subset", "minibatch")


def fit_centroids(store: EmbeddingStore | list, clusters: int, subset_pixels: int = 1_000_000, iterations: int = 20,
                  redo: int = 1, seed: int = 0, device: str = "auto", backend: str = "auto",
                  progress: bool = True, metric: str = "spherical", fit_mode: str = "subset",
                  minibatch_images: int = 3200, minibatch_sample_images: int | None = 20000) -> tuple[np.ndarray, dict]:
    """k-means of a random pixel subset: (centroids float32 [clusters, C], metadata).

    metric 'spherical': centroids on the unit sphere, nearest = largest cosine; 'euclidean': Eq. 3's
    squared-L2 k-means of the (normalised) features, centroids left as plain means (the reference
    code's faiss IndexFlatL2). assign tells the two apart by the centroids' norms.
    fit_mode 'subset': the subset is drawn from all images (the paper's U_init); 'minibatch' (the
    reference code): from the first `minibatch_images` images only, then running means over each
    further group of as many images (umtfss/clustering/minibatch.py), over a seeded random draw of
    `minibatch_sample_images` images when the store has more.
    """
    if metric not in METRICS:
        raise ValueError(f"config key 'clustering.metric' is '{metric}', expected one of {', '.join(METRICS)}")
    if fit_mode not in FIT_MODES:
        raise ValueError(f"config key 'clustering.fit_mode' is '{fit_mode}', expected one of {', '.join(FIT_MODES)}")
    if clusters > LABEL_MAX:  # assign's int16 label store would refuse them, after the whole fit
        raise ValueError(f"config key 'clustering.clusters' is {clusters}, expected at most {LABEL_MAX} "
                         "(the label stores hold int16 cluster ids)")
    if not isinstance(store, EmbeddingStore):
        store = EmbeddingStore(store)
    backend, train_device = choose_backend(backend, device)
    minibatch = fit_mode == "minibatch"
    groups = image_groups(len(store), minibatch_images, minibatch_sample_images, seed) if minibatch else None
    first_images = groups.first if minibatch else None
    started = time.perf_counter()
    points = sample_pixels(store, subset_pixels, seed, progress=progress, images=first_images)
    if len(points) < clusters:
        raise ValueError(too_few_pixels(len(points), clusters, subset_pixels, groups))
    sampled = time.perf_counter()
    spherical = metric == "spherical"
    kmeans = train_kmeans(points, clusters, iterations, redo, seed, backend=backend, device=train_device,
                          spherical=spherical, progress=progress)
    subset_size, dim = points.shape
    centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    if spherical:
        normalise_rows(centroids)
    fitted = time.perf_counter()
    if minibatch:
        centroids, minibatch_meta = running_means(store, centroids, groups, spherical, progress=progress)
        minibatch_meta["seconds"] = round(time.perf_counter() - fitted, 3)
    # the final centroids, as assign will use them (minibatch's pixels_per_cluster counts under earlier ones)
    empty = np.flatnonzero(cluster_sizes(points, centroids, train_device) == 0)
    distinct = distinct_rows(points) if empty.size else None
    del points
    if empty.size:
        print(empty_cluster_warning(empty, clusters, subset_size, distinct), file=sys.stderr, flush=True)
    total_valid = int((store.valid_all[:, 0].astype(np.int64) * store.valid_all[:, 1]).sum())
    meta = {
        "clusters": clusters,
        "metric": metric,
        "subset_pixels_requested": subset_pixels,
        "subset_pixels": int(subset_size),
        "valid_pixels": total_valid,
        "images": len(store),
        "dim": int(dim),
        "fit_mode": fit_mode,
        "iterations": iterations,
        "redo": redo,
        "seed": seed,
        # sum over the subset of the cosine similarity to the nearest centroid (spherical) or of the squared
        # distance to it (euclidean), per iteration of every restart
        # (a restart ends early once the objective (faiss) or the assignment (torch) stops changing);
        # with fit_mode minibatch, of the first group's k-means (minibatch.group_objective_mean follows the updates)
        "objective": [float(v) for v in kmeans.obj],
        "objective_final": float(kmeans.obj[-1]) if len(kmeans.obj) else None,
        # clusters that no pixel of the subset is nearest to (final centroids, assign's rule): near-duplicate
        # centroids of nearly constant features (ids: the first EMPTY_IDS_RECORDED); distinct rows of the
        # subset, counted only when some cluster is empty
        "empty_clusters": int(empty.size),
        "empty_cluster_ids": [int(c) for c in empty[:EMPTY_IDS_RECORDED]],
        "subset_distinct_points": distinct,
        "seconds_sampling": round(sampled - started, 3),
        "seconds_kmeans": round(fitted - sampled, 3),
        "backend": backend,
        "device": train_device,
        "faiss_version": faiss.__version__,
        "torch_version": torch.__version__,
        "gpu": train_device != "cpu",
        "centroids_sha256": array_sha256(centroids),
        "embeddings": [str(p) for p in store.paths],
        "embedding": {key: store.attrs.get(key) for key in EMBEDDING_ATTRS if key not in ("shard",)},
    }
    if minibatch:
        meta["minibatch"] = {"group_images": minibatch_images, "sample_images": minibatch_sample_images,
                             **minibatch_meta}
    return centroids, meta


def write_fit(centroids: np.ndarray, meta: dict, out_centroids: str | Path, out_meta: str | Path) -> None:
    """centroids.npy and fit.json, each written atomically; both are renamed only once both are written,
    so a killed fit does not leave new centroids beside an older fit.json (or the reverse)."""
    check_output_paths({"centroids": out_centroids, "fit metadata": out_meta})
    with contextlib.ExitStack() as stack:
        temp_centroids = stack.enter_context(atomic_path(out_centroids, sweep=True))
        temp_meta = stack.enter_context(atomic_path(out_meta, sweep=True))
        with open(temp_centroids, "wb") as handle:
            np.save(handle, centroids.astype(np.float32))
        Path(temp_meta).write_text(json.dumps(meta, indent=2) + "\n")


def cli(parser):
    """`umtfss fit`: centroids.npy + fit.json from one or more embedding shards."""
    parser.add_argument("--config", required=True, help="YAML path or inline JSON (section 'clustering')")
    parser.add_argument("--embeddings", nargs="+", required=True, help="embedding shard stores")
    parser.add_argument("--out-centroids", required=True, help="output centroids.npy")
    parser.add_argument("--out-meta", required=True, help="output fit.json")

    def run(args):
        from umtfss.config import load

        cfg = load(args.config)["clustering"]
        check_outputs_apart({"--out-centroids": args.out_centroids, "--out-meta": args.out_meta},
                            {"--embeddings": args.embeddings, "--config": [args.config]})
        check_output_paths({"--out-centroids": args.out_centroids, "--out-meta": args.out_meta}, kind="file")
        centroids, meta = fit_centroids(EmbeddingStore(args.embeddings), cfg["clusters"], cfg["subset_pixels"],
                                        cfg["iterations"], cfg["redo"], cfg["seed"], cfg["device"], cfg["backend"],
                                        metric=cfg["metric"], fit_mode=cfg["fit_mode"],
                                        minibatch_images=cfg["minibatch_images"],
                                        minibatch_sample_images=cfg["minibatch_sample_images"])
        write_fit(centroids, meta, args.out_centroids, args.out_meta)

    return run
