"""Extract region features for a folder or a list of images into a feature store (detector/store.py).

    python -m detector.extract --config DIR/detectron_config.yaml --checkpoint DIR/detectron_model.pth \\
        --out features.lmdb IMAGES_DIR_OR_FILES... [--list paths.txt] [--device cuda] [--num-regions 100]

Image ids are file names up to the first dot, as in the reference script. Images already in the store are
skipped, so an interrupted run resumes where it stopped. Unreadable images are reported and skipped (and the run
exits non-zero at the end), never silently dropped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from modelkit.regions import REGIONS_PER_IMAGE

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def collect_images(inputs: list[str], list_file: str | None) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            paths.append(path)
    if list_file:
        paths.extend(Path(line.strip()) for line in Path(list_file).read_text().splitlines() if line.strip())
    return paths


def image_id(path: Path) -> str:
    return path.name.split(".")[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files or folders")
    parser.add_argument("--list", help="a text file with one image path per line")
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="feature store directory (created if absent)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-regions", type=int, default=REGIONS_PER_IMAGE)
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    args = parser.parse_args(argv)

    from .extractor import RegionFeatureExtractor
    from .images import ImageDecodeError
    from .store import FeatureStore

    paths = collect_images(args.images, args.list)
    if not paths:
        parser.error("no images given")
    ids = [image_id(p) for p in paths]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        parser.error(f"several images share an id: {', '.join(sorted(duplicates)[:5])}")
    extractor = RegionFeatureExtractor.from_files(args.config, args.checkpoint, device=args.device,
                                                  min_size=args.min_size, max_size=args.max_size,
                                                  num_regions=args.num_regions)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    failures = 0
    with FeatureStore(args.out, readonly=False) as store:
        todo = [(p, i) for p, i in zip(paths, ids) if i not in store]
        if len(todo) < len(paths):
            print(f"resuming: {len(paths) - len(todo)} of {len(paths)} images already in {args.out}", file=sys.stderr)
        for path, key in tqdm(todo, desc="extracting", unit="img", file=sys.stderr):
            try:
                regions = extractor.extract([path])[0]
            except ImageDecodeError as exc:
                failures += 1
                tqdm.write(f"skipped {path}: {exc.message}", file=sys.stderr)
                continue
            store.put(key, regions)
    if failures:
        print(f"{failures} image(s) could not be read", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
