"""Parameter counts and GMACs of the model presets.

python -m benchmarks.summary [--presets-dir configuration/models] [--image-size 224] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from modeling_stpnet.configuration_stpnet import STPNetConfig
from modeling_stpnet.modeling_stpnet import STPNetForSemanticSegmentation

DEFAULT_PRESETS_DIR = Path(__file__).resolve().parent.parent / "configuration" / "models"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_gmacs(model: nn.Module, image_size: int, batch: int = 1) -> float:
    """Multiply-accumulates of one forward pass per image, in billions (torch's FLOP counter / 2)."""
    model.eval()
    x = torch.zeros(batch, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9 / batch


def load_presets(presets_dir: str | Path = DEFAULT_PRESETS_DIR) -> dict[str, STPNetConfig]:
    """`{"stpnet-tiny": config, ...}` from every JSON file in the presets folder."""
    paths = sorted(Path(presets_dir).glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"No preset JSON files in {presets_dir}")
    return {p.stem: STPNetConfig.from_json_file(str(p)) for p in paths}


def summarise(config: STPNetConfig, image_size: int) -> dict[str, float]:
    model = STPNetForSemanticSegmentation(config)
    retrieval = getattr(model, "retrieval", None)
    backbone = getattr(retrieval, "backbone", None) if retrieval is not None else None
    return {
        "params_m": count_parameters(model) / 1e6,
        "retrieval_backbone_params_m": (count_parameters(backbone) / 1e6) if backbone is not None else 0.0,
        "gmacs": count_gmacs(model, image_size),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets-dir", default=str(DEFAULT_PRESETS_DIR))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    rows = []
    for name, config in load_presets(args.presets_dir).items():
        for backbone in dict.fromkeys([config.retrieval_backbone, "shared"]):
            label = name if backbone == config.retrieval_backbone else f"{name}-shared"
            if any(r["model"] == label for r in rows):  # a preset that is itself the shared variant of another
                continue
            variant = STPNetConfig(**{**config.to_diff_dict(), "retrieval_backbone": backbone})
            encoder = (config.backbone_config or {}).get("model_type", f"paper c={config.base_channels}")
            row = {"model": label, "encoder": encoder, "backbone": backbone}
            rows.append({**row, **summarise(variant, args.image_size)})
    print(
        f"{'model':<26} {'encoder':<14} {'retrieval':<10} {'params (M)':>11} {'retrieval (M)':>14} "
        f"{'GMACs@' + str(args.image_size):>10}"
    )
    for r in rows:
        print(
            f"{r['model']:<26} {r['encoder']:<14} {r['backbone']:<10} {r['params_m']:>11.2f} "
            f"{r['retrieval_backbone_params_m']:>14.2f} {r['gmacs']:>10.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"image_size": args.image_size, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
