#!/usr/bin/env python
"""Make the bundled sample ``sample/kvasir-seg-mini`` from a full Kvasir-SEG copy, in the same raw layout.

48 pairs, chosen with a seeded RNG: 32 train + 8 validation (disjoint, both from the official train list) and 8
test (from the official val list). Images are RGB JPEGs downsized so the short side is 160 px; masks are binary
0/255 PNGs (the source JPEG masks thresholded at 127, resized bilinearly, re-thresholded at 128). Split lists:
``split_train.txt``, ``split_val.txt``, ``split_test.txt``. Re-running with the same arguments gives the same files.

    python hub_scripts/make_sample.py --source /work/shared/data/kvasir-seg --output sample/kvasir-seg-mini
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stpnet.data.io import find_by_stem, load_image, load_mask, mask_to_image  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "kvasir-seg"

SOURCE_MD = """# Kvasir-SEG mini sample (bundled with STPNet for tests and demos)

{n_train} train + {n_val} validation + {n_test} test image/mask pairs taken from the public **Kvasir-SEG** dataset
(full release: 1000 colonoscopy images with polyp masks), in the same raw layout as the original:

- `images/*.jpg`: RGB, downsized (Lanczos) so the short side is {short_side} px, JPEG quality {quality}.
- `masks/*.png`: binary 0/255 'L' PNGs: the original JPEG masks thresholded at 127, resized bilinearly to the
  image size and re-thresholded at 128.
- `split_train.txt`, `split_val.txt`, `split_test.txt`: file stems. Train and validation are disjoint subsets of
  the official Kvasir-SEG train list (`split_official_train.txt`); test is a subset of the official val list
  (`split_official_val.txt`, from `DebeshJha/2020-MediaEval-Medico-polyp-segmentation`).

## How it was made
`python hub_scripts/make_sample.py --seed {seed}` (deterministic): `random.Random({seed})` samples
{n_train_val} stems of the sorted official train list (first {n_train} -> train, rest -> validation) and {n_test}
stems of the sorted official val list. Source files: the Kvasir-SEG copy from the public GitHub repo
`simulamet-host/conditional-polyp-diffusion` (SimulaMet, the group that made Kvasir), commit
`46a1a4e156b152fc10ea324f0aba5b1323d7159b`, folders `Kvasir-SEG/images` and `Kvasir-SEG/masks`.

## Licence / citation (as the dataset owners state it)
Kvasir-SEG is open-access and may be used for research and educational purposes. Any use must cite:
D. Jha, P. H. Smedsrud, M. A. Riegler, P. Halvorsen, T. de Lange, D. Johansen, H. D. Johansen. "Kvasir-SEG: A
Segmented Polyp Dataset." MultiMedia Modeling (MMM) 2020, LNCS 11962, pp. 451-462.
Commercial use needs permission from the owners (Simula / datasets.simula.no/kvasir-seg).
This sample is a tiny downsized excerpt for testing only; it is not a benchmark.
"""


def read_list(path: Path) -> list[str]:
    return sorted(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def resize_pair(image: Image.Image, mask: np.ndarray, short_side: int) -> tuple[Image.Image, Image.Image]:
    scale = short_side / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    image = image.resize(size, Image.Resampling.LANCZOS)
    small = np.asarray(mask_to_image(mask).resize(size, Image.Resampling.BILINEAR)) >= 128
    return image, mask_to_image(small)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make sample/kvasir-seg-mini from Kvasir-SEG")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="full Kvasir-SEG folder")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "sample" / "kvasir-seg-mini")
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--val", type=int, default=8)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--short-side", type=int, default=160)
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality of the images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    official_train = read_list(args.source / "split_official_train.txt")
    official_val = read_list(args.source / "split_official_val.txt")
    picked = rng.sample(official_train, args.train + args.val)
    splits = {
        "train": sorted(picked[: args.train]),
        "val": sorted(picked[args.train :]),
        "test": sorted(rng.sample(official_val, args.test)),
    }
    if args.output.exists():
        shutil.rmtree(args.output)  # stale files from an earlier run would end up in the sample
    (args.output / "images").mkdir(parents=True)
    (args.output / "masks").mkdir()
    for split, stems in splits.items():
        for stem in stems:
            image_path = find_by_stem(args.source / "images", stem)
            mask_path = find_by_stem(args.source / "masks", stem)
            if image_path is None or mask_path is None:
                raise FileNotFoundError(f"{args.source}: image or mask for {stem!r} missing")
            image, mask = resize_pair(load_image(image_path), load_mask(mask_path, 127), args.short_side)
            image.save(args.output / "images" / f"{stem}.jpg", quality=args.quality)
            mask.save(args.output / "masks" / f"{stem}.png", optimize=True)
        (args.output / f"split_{split}.txt").write_text("\n".join(stems) + "\n", encoding="utf-8")
    (args.output / "SOURCE.md").write_text(
        SOURCE_MD.format(
            n_train=args.train,
            n_val=args.val,
            n_test=args.test,
            n_train_val=args.train + args.val,
            short_side=args.short_side,
            quality=args.quality,
            seed=args.seed,
        ),
        encoding="utf-8",
    )
    total = sum(p.stat().st_size for p in args.output.rglob("*") if p.is_file())
    print(f"wrote {args.output}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f"; {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
