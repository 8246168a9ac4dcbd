"""The assign stage: every pixel of a shard gets its nearest centroid by cosine similarity (paper Eq. 4)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from umtfss.clustering.refine import (
    SUPERPIXEL_MIN_SIZE, SUPERPIXEL_SCALE, SUPERPIXEL_SIGMA, UPSAMPLINGS, embedded_view, grid_majority,
    refine_labels, superpixel_majority,
)
from umtfss.devices import resolve_device
from umtfss.io import OutputInTheWay, atomic_path, check_output_paths, check_outputs_apart
from umtfss.pseudo_episodes import bilinear_taps
from umtfss.stores import EMBEDDING_ATTRS, BackgroundWriter, EmbeddingStore, array_sha256, create_label_store, prefetch
from umtfss.progress import tqdm


def load_centroids(centroids: str | Path | np.ndarray) -> np.ndarray:
    """float32 [N, C] centroids from an array or a .npy path, checked for shape and finite values."""
    centroids_path = None
    if not isinstance(centroids, np.ndarray):
        centroids_path = centroids
        path = Path(centroids)
        if path.is_dir():
            raise IsADirectoryError(f"centroids file '{path}' is a folder; expected the fit stage's centroids.npy")
        if not path.is_file():
            raise FileNotFoundError(f"centroids file '{path}' does not exist (expected the fit stage's centroids.npy)")
        with open(path, "rb") as handle:
            magic = handle.read(6)
        if magic != b"\x93NUMPY":  # a text file, an empty one, a .npz: numpy's own errors are pickle or EOF ones
            raise ValueError(f"centroids file '{path}' is not a .npy file ({'empty' if not magic else 'no NumPy header'}); "
                             "expected the fit stage's centroids.npy")
        try:
            centroids = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as err:
            raise ValueError(f"centroids file '{path}' is not a readable .npy array ({type(err).__name__}: {err}); "
                             "it may be truncated: rerun fit") from None
    source = f"centroids file '{centroids_path}'" if centroids_path else "the centroids"
    if centroids.ndim != 2 or centroids.shape[0] < 1:
        raise ValueError(f"{source} have shape {centroids.shape}, expected [clusters, channels]")
    if not np.isfinite(centroids).all():
        raise ValueError(f"{source} hold non-finite values (NaN or inf); expected the fit stage's centroids.npy")
    return np.ascontiguousarray(centroids, dtype=np.float32)


# what makes two stores' features comparable: fit.json's "embedding" against the store's attributes
# (not dtype, forward_precision, shard or version: shards embedded on different machines still agree)
SAME_EMBEDDING_KEYS = ("backbone", "layer", "stride", "image_size", "dim", "checkpoint_sha256", "preprocessing")


def fit_record(centroids_path: str | Path, matrix: np.ndarray, warn: str | None = None) -> tuple[dict, Path] | None:
    """The fit.json beside a centroids file, when it describes these very centroids (else None).

    With `warn` (the stage's name), a fit.json there that records other centroids is said on stderr:
    the embedding check it would give is then skipped, which should not pass unnoticed.
    """
    meta_path = Path(centroids_path).with_name("fit.json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("centroids_sha256") != array_sha256(matrix):
        if warn and isinstance(meta, dict) and "centroids_sha256" in meta:
            print(f"umtfss {warn}: warning: '{meta_path}' records other centroids than '{centroids_path}' holds "
                  "(a fit killed between its two outputs, or centroids written otherwise); what they were fit on "
                  "cannot be checked against the embedding store: rerun fit to be sure", file=sys.stderr)
        return None
    return meta, meta_path


def check_same_embedding(fit_meta: dict, store: EmbeddingStore, store_path, fitted_on: str) -> None:
    """Refuse a store whose embeddings are not those the centroids were fit on (fit_meta['embedding'])."""
    fitted = fit_meta.get("embedding") or {}
    differ = [f"{key}: {fitted[key]!r} (fit) vs {store.attrs.get(key)!r} (store)" for key in SAME_EMBEDDING_KEYS
              if key in fitted and fitted[key] != store.attrs.get(key)]
    if differ:
        raise ValueError(f"{fitted_on} were fit on other embeddings than embedding store '{store_path}' holds: "
                         f"{'; '.join(differ)}; fit and assign must use the same embeddings")


ROWS_PER_BLOCK = 2048  # pixels converted to float32 and multiplied at once on CPU: 2 MB at 256 channels
# stays in a 1-2 MB L2 cache (4,096 rows were 20-30 % slower per pixel on the project's CPU)


def normalise_rows(array: np.ndarray) -> np.ndarray:
    """Divide every row of a float array by its L2 norm, in place (zero rows stay zero); returns it."""
    np.divide(array, np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12), out=array)
    return array


def l2_offsets(centroids: torch.Tensor) -> torch.Tensor | None:
    """|c|^2 / 2 per centroid when the centroids are not unit vectors (euclidean k-means), else None.

    The nearest centroid in L2 maximises x.c - |c|^2/2; for unit centroids (spherical k-means) the
    offset is the same for all, so the largest inner product (cosine) is the same choice.
    """
    squares = (centroids.float() ** 2).sum(dim=1)
    return None if torch.allclose(squares, torch.ones_like(squares), atol=1e-4) else squares / 2


def nearest_centroid(features: np.ndarray, centroids: torch.Tensor) -> np.ndarray:
    """[..., C] features -> int16 [...] index of the nearest centroid (first on ties): the largest inner
    product for unit centroids (spherical), the smallest L2 distance otherwise (see l2_offsets).

    A matmul + argmax: on CPU in blocks of ROWS_PER_BLOCK pixels (float16 -> float32 conversion and
    product stay in cache; as fast as faiss IndexFlatIP, see benchmarks/assign_throughput.py); on GPU
    the whole batch at once, in the centroids' precision (half for float16 stores).
    """
    shape = features.shape[:-1]
    flat = np.ascontiguousarray(features.reshape(-1, features.shape[-1]))
    offsets = l2_offsets(centroids)
    with torch.inference_mode():
        if centroids.device.type == "cuda":
            batch = torch.from_numpy(flat).to(centroids.device, non_blocking=True).to(centroids.dtype)
            scores = batch @ centroids.T
            scores = scores if offsets is None else scores.float() - offsets
            labels = scores.argmax(dim=1).to(torch.int16).cpu().numpy()
        else:
            transposed = centroids.T.contiguous()
            labels = np.empty(len(flat), np.int16)
            for start in range(0, len(flat), ROWS_PER_BLOCK):
                # torch's float16 -> float32 conversion is vectorised; numpy's astype is ~8x slower
                block = torch.from_numpy(flat[start:start + ROWS_PER_BLOCK]).float()
                scores = block @ transposed
                if offsets is not None:
                    scores -= offsets
                labels[start:start + ROWS_PER_BLOCK] = scores.numpy().argmax(axis=1)
    return labels.reshape(shape)


def _corner_aligned(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bilinear_taps (aligned corners, as F.interpolate(align_corners=True)) as torch index and weight tensors."""
    lower, upper, weight = bilinear_taps(in_size, out_size)
    return torch.from_numpy(lower), torch.from_numpy(upper), torch.from_numpy(weight).float()


BILINEAR_STRIP_ROWS = 64  # output rows scored at once: N x 64 x width floats (6 MB at N = 50, 473 px)


def bilinear_labels(cells: np.ndarray, centroids: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """int16 [h, w] nearest centroid of every pixel of an image of `size`, from its valid grid cells
    [rows, cols, C] and float32 CPU centroids: the cells' centroid scores (x.c, less |c|^2/2 for non-unit centroids, see
    l2_offsets) are interpolated bilinearly with aligned corners and the largest wins (the reference
    code's assign, which interpolates its negative squared distances the same way).

    Separable and in strips of output rows, so memory stays N x rows x w, never N x h x w.
    """
    height, width = size
    with torch.inference_mode():
        scores = torch.from_numpy(np.ascontiguousarray(cells)).float() @ centroids.T  # [rows, cols, N]
        offsets = l2_offsets(centroids)
        if offsets is not None:
            scores -= offsets
        left, right, across = _corner_aligned(scores.shape[1], width)
        scores = scores[:, left] * (1 - across)[None, :, None] + scores[:, right] * across[None, :, None]
        top, bottom, down = _corner_aligned(scores.shape[0], height)
        labels = np.empty((height, width), np.int16)
        for start in range(0, height, BILINEAR_STRIP_ROWS):
            rows = slice(start, start + BILINEAR_STRIP_ROWS)
            weight = down[rows][:, None, None]
            strip = scores[top[rows]] * (1 - weight) + scores[bottom[rows]] * weight
            labels[rows] = strip.argmax(dim=2).numpy()
    return labels


def gather_valid_cells(block: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[m, C] the valid cells of a batch [b, gh, gw, C], image after image, row-major (one copy per image)."""
    counts = [int(rows) * int(cols) for rows, cols in valid]
    cells = np.empty((sum(counts), block.shape[-1]), block.dtype)
    start = 0
    for row, ((rows, cols), count) in enumerate(zip(valid, counts)):
        cells[start:start + count].reshape(rows, cols, -1)[...] = block[row, :rows, :cols]
        start += count
    return cells


def valid_cells_nearest(block: np.ndarray, valid: np.ndarray, centroids: torch.Tensor) -> np.ndarray:
    """int16 [b, gh, gw] labels of a batch [b, gh, gw, C]: nearest centroid of every valid cell, -1 on padding.

    Only the valid cells are searched (gathered into one array first): padding is a quarter of the
    grid for a 4:3 photo at a square input, and would cost the same matmul as the image itself.
    """
    labels = np.full(block.shape[:3], -1, np.int16)
    cells = gather_valid_cells(block, valid)
    if len(cells) == 0:
        return labels
    nearest = nearest_centroid(cells, centroids)
    start = 0
    for row, (rows, cols) in enumerate(valid):
        labels[row, :rows, :cols] = nearest[start:start + rows * cols].reshape(rows, cols)
        start += rows * cols
    return labels


def _image_paths(images, store: EmbeddingStore) -> dict[str, str]:
    """image_id -> file of every image of the shard, from the prepare stage's image table."""
    from umtfss.embedding import load_image_table

    if images is None:
        raise ValueError("config key 'clustering.refine' is 'superpixel' but no image table was given "
                         "(umtfss assign --images images.parquet): superpixels are computed on the images")
    table = load_image_table(images).drop_duplicates("image_id")
    paths = dict(zip(table["image_id"].astype(str), table["image_path"].astype(str)))
    missing = [i for i in store.image_ids if i not in paths]
    if missing:
        name = images if isinstance(images, (str, Path)) else "<DataFrame>"
        raise ValueError(f"{len(missing)} image(s) of embedding store '{store.paths[0]}' are not in image table "
                         f"'{name}', e.g. {missing[:3]}; expected the table the shard was embedded from")
    return paths


def _with_views(batches, store: EmbeddingStore, paths: dict[str, str], image_size: int):
    """Add to each batch the images as the embedder saw them (read on prefetch's thread, beside the compute)."""
    for indices, block, valid in batches:
        views = []
        for index in indices:
            image_id = store.image_ids[index]
            view, size = embedded_view(paths[image_id], image_size)
            if tuple(size) != store.size(index):
                raise ValueError(f"image '{paths[image_id]}' (image_id '{image_id}') is {size[0]}x{size[1]} but was "
                                 f"{store.size(index)[0]}x{store.size(index)[1]} when embedded into "
                                 f"'{store.paths[0]}'; rerun embed")
            views.append(view)
        yield indices, block, valid, views


def check_label_output(out: str | Path) -> None:
    """Refuse an output that is a Zarr store of another kind (an embedding store): atomic_path replaces any
    folder holding a zarr.json, and it would delete that store's features."""
    out = Path(out)
    if (out / "zarr.json").is_file() and ((out / "features").exists() or not (out / "labels").is_dir()):
        kind = "an embedding store" if (out / "features").exists() else "a Zarr store without array 'labels'"
        raise OutputInTheWay(f"output '{out}' is {kind}, not a label store of an earlier assign; writing would "
                             "replace it, so it is left as it is: give another path")


def assign_shard(embedding_shard_path: str | Path, centroids: str | Path | np.ndarray, out: str | Path,
                 batch_images: int = 32, device: str = "auto", refine: str = "none", *, images=None,
                 superpixel_scale: float = SUPERPIXEL_SCALE, superpixel_sigma: float = SUPERPIXEL_SIGMA,
                 superpixel_min_size: int = SUPERPIXEL_MIN_SIZE, upsample: str = "bilinear",
                 progress: bool = True, fit_meta: dict | None = None) -> Path:
    """Write the label store of one embedding shard: nearest centroid per grid cell, -1 on padding.

    A shard embedded otherwise than the centroids were fit on (the fit.json beside a centroids path, or
    `fit_meta` for an array) is refused.

    With refine='superpixel' (needs `images`, the image table) the labels are refined on each image as
    the embedder saw it (umtfss/clustering/refine.py): per-pixel labels from the centroid scores
    interpolated bilinearly (`upsample` 'bilinear', reference code; bilinear_labels) or from the grid
    labels resized nearest ('nearest'), then the superpixel majority vote. Array 'refined' [n, S, S]
    holds them, -1 on padding, and 'labels' the per-cell majority of the refined labels.
    Streams `batch_images` images at a time (reading the next batch while this one is assigned and the
    previous one written: memory bounded by a few batches); the store is written into a
    temporary sibling and renamed at the end. Returns `out`.
    """
    if refine not in ("none", "superpixel"):
        raise ValueError(f"config key 'clustering.refine' is '{refine}', expected none or superpixel")
    if upsample not in UPSAMPLINGS:
        raise ValueError(f"config key 'clustering.refine_upsample' is '{upsample}', expected "
                         f"{' or '.join(UPSAMPLINGS)}")
    if batch_images < 1:
        raise ValueError(f"batch_images must be >= 1, got {batch_images}")
    check_output_paths({"output": out})
    check_label_output(out)
    store = EmbeddingStore([embedding_shard_path])
    refining = refine == "superpixel"
    if refining:
        paths = _image_paths(images, store)
        image_size = store.attrs.get("image_size")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"embedding store '{embedding_shard_path}' has image_size={image_size!r}, expected the "
                             "embed input size (int); superpixel refinement needs it")
    matrix = load_centroids(centroids)
    if matrix.shape[1] != store.dim:
        raise ValueError(f"centroids have {matrix.shape[1]} channels but embedding store '{embedding_shard_path}' "
                         f"has {store.dim}; fit and assign must use the same embeddings")
    record = fit_record(centroids, matrix, warn="assign") if not isinstance(centroids, np.ndarray) else None
    if record is not None:
        check_same_embedding(record[0], store, embedding_shard_path,
                             f"centroids '{centroids}' (as '{record[1]}' records them)")
    elif fit_meta:
        check_same_embedding(fit_meta, store, embedding_shard_path, "the centroids")
    if matrix.shape[0] > np.iinfo(np.int16).max:
        raise ValueError(f"{matrix.shape[0]} clusters do not fit the int16 label store (max 32767)")
    torch_device = resolve_device(device, "clustering.device")
    cpu_centroids = torch.from_numpy(matrix)  # float32, for the per-pixel scores of the bilinear refinement
    centroid_tensor = cpu_centroids.to(torch_device)
    if torch_device.type == "cuda" and store.dtype == np.float16:
        centroid_tensor = centroid_tensor.half()
    attrs = {key: store.attrs.get(key) for key in EMBEDDING_ATTRS}
    attrs.update(image_ids=store.image_ids, clusters=int(matrix.shape[0]), centroids_sha256=array_sha256(matrix),
                 grid=list(store.grid), embeddings=str(embedding_shard_path), refine=refine)
    if refining:
        attrs.update(superpixel_scale=superpixel_scale, superpixel_sigma=superpixel_sigma,
                     superpixel_min_size=superpixel_min_size, refine_upsample=upsample)
    with atomic_path(out, sweep=True, folder=True, marker="labels/zarr.json") as temp:
        group = create_label_store(temp, len(store), store.grid, attrs, refined_size=image_size if refining else None)
        writer = BackgroundWriter(group["labels"])
        refined_writer = BackgroundWriter(group["refined"]) if refining else None
        try:
            bar = tqdm(total=len(store), desc="assign" + (" + superpixels" if refining else ""), unit="img",
                       file=sys.stderr, disable=not progress)
            batches = store.iter_batches(batch_images)
            if refining:
                batches = _with_views(batches, store, paths, image_size)
            for indices, block, valid, *views in prefetch(batches):
                labels = valid_cells_nearest(block, valid, centroid_tensor)
                if refining:
                    fine = np.full((len(indices), image_size, image_size), -1, np.int16)
                    for row, ((rows, cols), view) in enumerate(zip(valid, views[0])):
                        if upsample == "bilinear":
                            pixels = bilinear_labels(block[row, :rows, :cols], cpu_centroids, view.shape[:2])
                            refined = superpixel_majority(pixels, view, superpixel_scale, superpixel_sigma,
                                                          superpixel_min_size)
                        else:
                            refined = refine_labels(labels[row, :rows, :cols], view, superpixel_scale,
                                                    superpixel_sigma, superpixel_min_size)
                        fine[row, :refined.shape[0], :refined.shape[1]] = refined
                        labels[row, :rows, :cols] = grid_majority(refined, (rows, cols))
                    refined_writer.put(indices.start, fine)
                writer.put(indices.start, labels)
                bar.update(len(indices))
            bar.close()
        finally:
            writer.close()
            if refined_writer is not None:
                refined_writer.close()
    return Path(out)


def cli(parser):
    """`umtfss assign`: the label store of one embedding shard."""
    parser.add_argument("--config", required=True, help="YAML path or inline JSON (section 'clustering')")
    parser.add_argument("--embeddings", required=True, help="one embedding shard store")
    parser.add_argument("--centroids", required=True, help="centroids.npy from the fit stage")
    parser.add_argument("--out", required=True, help="output label store, e.g. labels/shard-0-of-8.zarr")
    parser.add_argument("--batch-images", type=int, default=32, help="images per read/assign batch")
    parser.add_argument("--images", default=None,
                        help="images.parquet from the prepare stage; needed when clustering.refine is superpixel")

    def run(args):
        from umtfss.config import load

        cfg = load(args.config)["clustering"]
        if args.batch_images < 1:
            raise ValueError(f"--batch-images is {args.batch_images}, expected 1 or more")
        check_outputs_apart({"--out": args.out}, {"--embeddings": [args.embeddings], "--centroids": [args.centroids],
                                                  "--images": [args.images] if args.images else []})
        check_output_paths({"--out": args.out})
        assign_shard(args.embeddings, args.centroids, args.out, batch_images=args.batch_images,
                     device=cfg["device"], refine=cfg["refine"], images=args.images,
                     superpixel_scale=cfg["superpixel_scale"], superpixel_sigma=cfg["superpixel_sigma"],
                     superpixel_min_size=cfg["superpixel_min_size"], upsample=cfg["refine_upsample"])

    return run
