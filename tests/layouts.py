"""On-disk dataset layouts and masks that the data tests build themselves (Kvasir-SEG, QaTa-COV19, LViT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stpnet.text_repository import ScaleAwareTextRepository

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "configuration" / "text"
KVASIR = ScaleAwareTextRepository.from_json_file(TEXT / "kvasir-seg.json")
LUNG = ScaleAwareTextRepository.from_json_file(TEXT / "qata-cov19.json")


def blob_mask(height: int, width: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Boolean mask with filled rectangles (y0, x0, y1, x1)."""
    mask = np.zeros((height, width), dtype=bool)
    for y0, x0, y1, x1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def write_pair(images: Path, masks: Path, stem: str, boxes, size=(48, 40), mask_ext=".jpg", mask_prefix="") -> None:
    width, height = size
    rng = np.random.default_rng(sum(stem.encode()))  # str hash() is salted per process
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(images / f"{stem}.jpg")
    mask = Image.fromarray(np.where(blob_mask(height, width, boxes), 255, 0).astype(np.uint8))
    mask.save(masks / f"{mask_prefix}{stem}{mask_ext}")


def make_kvasir(root: Path, n_train: int = 10, n_test: int = 3) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    train = [f"tr{i:02d}" for i in range(n_train)]
    test = [f"te{i:02d}" for i in range(n_test)]
    for stem in train + test:
        write_pair(root / "images", root / "masks", stem, [(8, 10, 24, 30)])
    (root / "split_official_train.txt").write_text("\n".join(train) + "\n")
    (root / "split_official_val.txt").write_text("\n".join(test) + "\n")
    return root


QATA_ROWS = [  # pulmonary_infection, infected_area, zones, expected (laterality, count, left, right)
    (1, 1, "0 0 0 0 0 1", (0, 0, "no lesion in left lung", "lower right lung")),
    (2, 2, "1 0 0 0 0 1", (1, 1, "upper left lung", "lower right lung")),
    (1, 2, "1 0 1 0 0 0", (0, 1, "upper lower left lung", "no lesion in right lung")),
    (2, 6, "1 1 1 1 1 1", (1, 1, "upper middle lower left lung", "upper middle lower right lung")),
]


def make_qata(root: Path, splits=("train", "valid", "test"), rows=QATA_ROWS) -> Path:
    for split in splits:
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        records = []
        for i, (lat, area, zones, _) in enumerate(rows):
            name = f"{split}_{i}.png"
            Image.fromarray(np.full((32, 32), 40 * i, dtype=np.uint8)).save(root / split / "images" / name)
            Image.fromarray(np.where(blob_mask(32, 32, [(4, 4, 12, 12)]), 255, 0).astype(np.uint8)).save(
                root / split / "masks" / f"mask_{name}"
            )
            records.append(
                {
                    "image": name,
                    "mask": f"mask_{name}",
                    "caption_sgseg": "x",
                    "pulmonary_infection": lat,
                    "infected_area": area,
                    "pseudo_label_6zones": zones,
                }
            )
        pd.DataFrame(records).to_csv(root / f"{split}_text.csv", index=False)
    return root


LVIT_TEXT = [
    "Bilateral pulmonary infection, two infected areas, middle left lung and upper right lung.",
    "Unilateral pulmonary infection, one infected area, all left lung.",
    "Bilateral pulmonary infection, three infected areas,upper midlle left lung and lower right lung.",
]


def make_lvit(root: Path, texts=LVIT_TEXT, mask_named_text: bool = False) -> Path:
    for prefix in ("Train", "Val", "Test"):
        folder = root / f"{prefix}_Folder"
        (folder / "img").mkdir(parents=True)
        (folder / "labelcol").mkdir()
        rows = []
        for i, text in enumerate(texts):
            name = f"{prefix.lower()}{i}.png"
            Image.fromarray(np.full((24, 24), 30 * i, dtype=np.uint8)).save(folder / "img" / name)
            Image.fromarray(np.where(blob_mask(24, 24, [(2, 2, 9, 9)]), 255, 0).astype(np.uint8)).save(
                folder / "labelcol" / name
            )
            rows.append({"Image": f"mask_{name}" if mask_named_text else name, "Description": text})
        pd.DataFrame(rows).to_excel(folder / f"{prefix}_text.xlsx", index=False)
    return root
