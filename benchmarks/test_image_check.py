"""Benchmark: what the test-image check of a folder source adds to each Snakemake start, beside the
folder's fingerprint that the start already computes (the two share one scan of the folder).

A synthetic folder of N files (sizes drawn like JPEG photographs: log-normal around 100 KB, so that many
files share a size with a test image, as in a real folder) and a test set of M files, a few of them
copied into the folder; with --same-size every file has one size, as uncompressed images of one shape
(TIFF, BMP) do, the worst case. Side by side in one run: (1) the scan and the fingerprint (paid
already), (2) the check on a first start: `shared_images` over the scan (stat of both sets, heads of
same-size files, whole files only where the heads agree), (3) the check on a later start, when the memo
says both sets passed unchanged (stat only). Reports the three and the bytes the check read; the copies
must be found (the memo is written after the copies are removed again).

    python benchmarks/test_image_check.py                  # 20,000 folder images, 1,449 test images (PASCAL val)
    python benchmarks/test_image_check.py --same-size
    python benchmarks/test_image_check.py --folder 2000 --test 200
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def write_files(folder: Path, count: int, rng: np.random.Generator, prefix: str, same_size: bool) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    if same_size:
        sizes = np.full(count, 100_000)
    else:
        sizes = np.clip(rng.lognormal(np.log(100_000), 0.5, count), 2_000, 2_000_000).astype(int)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"{prefix}{i:06d}.jpg"
        path.write_bytes(rng.bytes(int(size)))
        paths.append(path)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=int, default=20_000, help="images in the unlabeled folder")
    parser.add_argument("--test", type=int, default=1_449, help="test images (PASCAL val: 1,449)")
    parser.add_argument("--copies", type=int, default=3, help="test images copied into the folder")
    parser.add_argument("--same-size", action="store_true", help="every file of one size (the worst case)")
    args = parser.parse_args(argv)

    import shutil

    from umtfss.data import overlap
    from umtfss.data.folder import folder_fingerprint, scan_image_folder

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder, test_dir = Path(tmp) / "folder", Path(tmp) / "test"
        write_files(folder, args.folder, rng, "u", args.same_size)
        test = write_files(test_dir, args.test, rng, "t", args.same_size)
        for path in test[:args.copies]:
            shutil.copy(path, folder / f"copy_{path.name}")
        read = {"bytes": 0}
        digest = overlap._digest

        def counting(path, limit):
            read["bytes"] += min(path.stat().st_size, limit or path.stat().st_size)
            return digest(path, limit)

        overlap._digest = counting
        start = time.perf_counter()
        scan = scan_image_folder(folder)
        folder_fingerprint(folder, paths=scan)
        fingerprint_s = time.perf_counter() - start
        start = time.perf_counter()
        pairs = overlap.shared_images(test, scan.values())
        check_s = time.perf_counter() - start
        overlap._digest = digest
        for path in test[:args.copies]:
            (folder / f"copy_{path.name}").unlink()
        scan = scan_image_folder(folder)
        config = {"unlabeled": {"source": "folder", "folder": str(folder)}}
        memo = Path(tmp) / "memo.txt"
        overlap.shared_images = lambda *a: []  # the first start's comparison is timed above; here the memo
        reader = type("Reader", (), {"image_ids": lambda self, split: [p.name for p in test],
                                     "image_path": lambda self, i, split: test_dir / i})()
        import umtfss.data.base

        umtfss.data.base.open_dataset = lambda name, config: reader
        overlap.check_test_images_unseen(config, "custom", scan.values(), memo=memo)  # writes the memo
        start = time.perf_counter()
        overlap.check_test_images_unseen(config, "custom", scan.values(), memo=memo)
        memo_s = time.perf_counter() - start
    found = sorted(p.name for p, _ in pairs)
    assert found == sorted(p.name for p in test[:args.copies]), found
    total = args.folder + args.copies
    print(f"folder of {total} images, {args.test} test images, {args.copies} copies (found: {len(pairs)})")
    print(f"scan and fingerprint (paid at every start already): {fingerprint_s:.2f} s")
    print(f"test-image check, first start: {check_s:.2f} s ({check_s / fingerprint_s:.1f}x the fingerprint), "
          f"{read['bytes'] / 2**20:.1f} MiB read")
    print(f"test-image check, a later start (memo): {memo_s:.2f} s ({memo_s / fingerprint_s:.1f}x the fingerprint)")


if __name__ == "__main__":
    main()
