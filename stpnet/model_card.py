"""The values that fill the model card template (``model_card.md``) for a trained checkpoint.

A card states how much data the numbers rest on (training, selection and evaluation images), says plainly when
the run is the bundled sample's pipeline check rather than a result, flags retrieval that does not beat its
majority-class floor, and separates the code's licence from the terms of the data the weights were learned from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open

from stpnet.inference.predict import is_hub_id
from stpnet.metrics import at_or_below_floor

# The sample bundled with the package (sample/kvasir-seg-mini): a run on it checks the pipeline and nothing more.
SAMPLE_NAME = "kvasir-seg-mini"
CODE_LICENSE = "Apache-2.0"

DATASETS = {
    "kvasir-seg": {
        "name": "Kvasir-SEG",
        "origin": "built automatically from the masks (count, size, horizontal and vertical position)",
        "citation": "Kvasir-SEG: D. Jha, P. H. Smedsrud, M. A. Riegler, P. Halvorsen, T. de Lange, D. Johansen, H. D. "
        'Johansen. "Kvasir-SEG: A Segmented Polyp Dataset." MultiMedia Modeling (MMM) 2020, LNCS 11962, pp. 451-462.',
        "terms": "open access for research and education; commercial use needs the owners' permission (Simula)",
        "license_name": "kvasir-seg",
        "license_link": "https://datasets.simula.no/kvasir-seg/",
        "splits": "As `prepare_dataset.py` builds Kvasir-SEG, `train` is the official training list (880 images, the "
        "validation split carved from it) and `test` the official validation list (120 images).",
    },
    "qata-cov19": {
        "name": "QaTa-COV19",
        "origin": "derived from the LViT/SGSeg text annotations (laterality, count, left and right lung zones)",
        "citation": "QaTa-COV19: Degerli et al., ICIP 2022 and Health Inf. Sci. Syst. 2021 (Qatar University, Tampere "
        "University). Text annotations: Li et al., LViT, IEEE TMI 2023; Ye et al., SGSeg, MICCAI 2024.",
        "terms": "distributed by its authors for research use",
        "license_name": "qata-cov19",
        "license_link": "https://www.kaggle.com/datasets/aysendegerli/qatacov19-dataset",
    },
    "mosmeddata-plus": {
        "name": "MosMedData+",
        "origin": "derived from the LViT text annotations",
        "citation": "MosMedData+: Morozov et al., 2020; text annotations: Li et al., LViT, IEEE TMI 2023.",
        "terms": "CC BY-NC-ND 3.0 (non-commercial)",
        "license_name": "mosmeddata-cc-by-nc-nd-3.0",
        "license_link": "https://creativecommons.org/licenses/by-nc-nd/3.0/",
    },
}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def is_sample_run(data: dict[str, Any], metrics: dict[str, Any]) -> bool:
    """Whether the checkpoint was trained or scored on the bundled sample (by the dataset's folder name)."""
    names = (data.get("dataset"), metrics.get("dataset"))
    return any(name and Path(str(name).rstrip("/")).name == SAMPLE_NAME for name in names)


def data_sizes(model_dir: Path) -> dict[str, int | None]:
    """Training and selection image counts: from ``selection.json`` in the checkpoint (written by training), else
    the run's ``run.json`` beside it; None where neither records them."""
    sizes: dict[str, int | None] = {"train": None, "validation": None}
    for path in (model_dir / "selection.json", model_dir.parent / "run.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            for key in sizes:
                if sizes[key] is None and isinstance(record.get(f"{key}_examples"), int):
                    sizes[key] = record[f"{key}_examples"]
    return sizes


def encoder_description(config: dict[str, Any]) -> str:
    """The U-shape's encoder in words: a transformers backbone (and where its weights started) or the paper's."""
    backbone = config.get("backbone_config")
    if backbone:
        start = f"started from `{config.get('backbone')}`" if config.get("use_pretrained_backbone") else "random init"
        return f"`{backbone.get('model_type')}` backbone encoder ({start})"
    return f"the paper's CNN encoder trained from scratch (base width {config.get('base_channels')} channels)"


def results_note(data: dict[str, Any] | None, split: str) -> str:
    """Whether the reported split also selected the checkpoint, from the training config's data section (None when
    the checkpoint came without ``train_config.yaml``). A run that carves its selection split out of train
    (``validation_from_train`` > 0, as the QaTa-COV19 recipes do) never selects on the dataset's validation split."""
    if data is None:
        return "How the checkpoint was selected is not recorded (no `train_config.yaml`)."
    if not data.get("validation_from_train") and split == data.get("validation_split", "validation"):
        return (
            f"Split `{split}` was also used to select the checkpoint, so these numbers are optimistic; evaluate on "
            "a split the run never saw for an unbiased estimate."
        )
    return f"Split `{split}` was never used for selection or early stopping."


def _images(value: Any) -> str:
    return f"{value} images" if isinstance(value, int) else "an unrecorded number of images"


def _data_description(
    data: dict[str, Any], metrics: dict[str, Any], split: str, sizes: dict[str, Any], splits: str = ""
) -> str:
    carved = data.get("validation_from_train")
    selection = f"a {carved:.0%} seeded carve of train" if carved else f"split `{data.get('validation_split', '?')}`"
    return (
        f"Dataset `{data.get('dataset', metrics.get('dataset', '?'))}`: trained on {_images(sizes['train'])} of "
        f"split `{data.get('train_split', 'train')}`, checkpoint selected on {_images(sizes['validation'])} "
        f"({selection}), evaluated on {_images(metrics.get('num_images'))} of split `{split}` of "
        f"`{metrics.get('dataset', '?')}`." + (f" {splits}" if splits else "")
    )


def sample_warning(sizes: dict[str, Any], num_images: Any) -> str:
    """The card's opening paragraph for a run on the bundled sample."""
    return (
        "> **A pipeline check, not a result.** This model comes from the small Kvasir-SEG sample bundled with "
        f"the STPNet package: trained on {_images(sizes['train'])} downsized to a 160 px short side, selected on "
        f"{_images(sizes['validation'])} and scored on {_images(num_images)}. It shows that training, evaluation "
        "and this card work end to end. Its numbers say nothing about how well STPNet segments polyps: do not use "
        "or cite them as a Kvasir-SEG result.\n\n"
    )


def retrieval_table(metrics: dict[str, Any]) -> str:
    """Markdown: retrieval accuracy per category against its majority-class floor, each one that does not beat it
    flagged, and a sentence saying what that means; empty for a model without text."""
    accuracy = metrics.get("retrieval_accuracy") or {}
    floor = metrics.get("retrieval_majority_baseline") or {}
    categories = [c for c, v in accuracy.items() if c != "mean" and v is not None]
    if not categories:
        return ""
    flagged = at_or_below_floor(accuracy, floor)
    rows = [
        f"| {c} | {_fmt(accuracy[c])} | {_fmt(floor.get(c))} | {'**at or below the floor**' if c in flagged else ''} |"
        for c in [*categories, "mean"]
        if accuracy.get(c) is not None
    ]
    lines = [
        "Text retrieval per category, against its majority-class floor (the accuracy of always answering the "
        "split's most frequent sentence):",
        "",
        "| category | accuracy | majority floor | |",
        "|---|---|---|---|",
        *rows,
    ]
    weak = [f"`{c}`" for c in flagged if c != "mean"]
    if weak:
        on_average = " (and on average)" if "mean" in flagged else ""
        lines += [
            "",
            f"Retrieval does not beat the floor for {', '.join(weak)}{on_average}: there the retrieved sentence tells "
            "no more about the image than always giving the most frequent one would.",
        ]
    return "\n".join(lines)


def license_values(known: dict[str, str], dataset_name: str) -> dict[str, str]:
    """Front matter and the Licence section: the code is Apache-2.0, the weights carry the data's terms."""
    if "license_name" not in known:
        return {
            "license": "license: apache-2.0\n",
            "license_text": f"The code is {CODE_LICENSE}. The weights were learned from `{dataset_name}`, whose "
            "terms this card does not know; they may restrict how the weights can be used. State them before "
            "sharing the model.",
        }
    return {
        "license": f"license: other\nlicense_name: {known['license_name']}\nlicense_link: {known['license_link']}\n",
        "license_text": f"The code (the STPNet package's `*.py` files that this checkpoint loads with "
        f"`trust_remote_code`) is {CODE_LICENSE}. The weights were learned from {known['name']}, whose terms are: "
        f"{known['terms']} ({known['license_link']}). Those terms apply to the weights, so the licence field above "
        f"is `other` and points to them; the {CODE_LICENSE} licence of the code does not extend to the weights.",
    }


def model_index(name: str, dataset_id: str, dataset_name: str, split: str, dice: Any, iou: Any) -> str:
    """The Hub's ``model-index`` (its evaluation-results widget) as front matter lines."""
    metrics = [
        {"type": kind, "value": round(float(value), 4) if isinstance(value, (int, float)) else None, "name": label}
        for kind, value, label in (("dice", dice, "Dice (per-image mean)"), ("iou", iou, "IoU (per-image mean)"))
    ]
    result = {
        "task": {"type": "image-segmentation", "name": "Binary lesion segmentation"},
        "dataset": {"type": dataset_id, "name": dataset_name, "split": split},
        "metrics": metrics,
    }
    return yaml.safe_dump({"model-index": [{"name": name, "results": [result]}]}, sort_keys=False)


def card_values(model_dir: Path, metrics: dict[str, Any], repo_id: str) -> dict[str, str]:
    """The template's fields from the checkpoint's config, its training config and the metrics."""
    config = json.loads((model_dir / "config.json").read_text())
    train_path = model_dir / "train_config.yaml"
    train = yaml.safe_load(train_path.read_text()) if train_path.is_file() else {}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        # parameters only: the stored text embeddings and BatchNorm statistics are buffers
        parameters = sum(_numel(handle.get_slice(k).get_shape()) for k in handle.keys() if not _is_buffer(k))
    repository = config.get("text_repository_name", "custom")
    known = DATASETS.get(repository, {"name": repository, "origin": "user-defined", "citation": ""})
    split = metrics.get("split", "test")
    data, optim = train.get("data", {}), train.get("train", {})
    sizes = data_sizes(model_dir)
    sample = is_sample_run(data, metrics)
    dataset_name = f"the {known['name']} sample bundled with STPNet" if sample else known["name"]
    length = f"{optim['max_steps']} steps" if optim.get("max_steps") else f"{optim.get('epochs', '?')} epochs"
    init_from = (train.get("model") or {}).get("init_from")
    training = (
        (f"fine-tuned from `{init_from}`; " if init_from else "")
        + f"{optim.get('optimizer', '?')} lr {optim.get('lr', '?')} ({optim.get('scheduler', '?')} schedule), batch "
        f"{optim.get('batch_size', '?')}, {length}, seed {optim.get('seed', '?')}, augmentation "
        f"{'on' if train.get('augment', {}).get('enabled') else 'off'}; full config in `train_config.yaml`."
        if train
        else "see the training configuration that came with this checkpoint."
    )
    dice, iou = _fmt(metrics.get("dice")), _fmt(metrics.get("iou"))
    num_images = metrics.get("num_images", "?")
    note = results_note(data if train else None, split)
    if sample:
        note += f" These are {num_images} images of the bundled sample: a check that evaluation runs, not a result."
    name = repo_id.split("/")[-1]
    return {
        "model_name": name,
        "repo_id": repo_id,
        # Hub metadata for the fine-tuning lineage; a local folder is no model id the Hub could link to
        "base_model": f"base_model: {init_from}\n" if init_from and is_hub_id(str(init_from)) else "",
        # No results widget for a pipeline check: the Hub would show its Dice like a benchmark score.
        "model_index": ""
        if sample
        else model_index(name, repository, known["name"], split, metrics.get("dice"), metrics.get("iou")),
        "sample_warning": sample_warning(sizes, num_images) if sample else "",
        "dataset_name": dataset_name,
        "split": split,
        "dice": dice,
        "iou": iou,
        "micro_dice": _fmt(metrics.get("micro_dice")),
        "micro_iou": _fmt(metrics.get("micro_iou")),
        "input_dice": _fmt((metrics.get("input_resolution") or {}).get("dice")),
        "retrieval_mean": _fmt((metrics.get("retrieval_accuracy") or {}).get("mean")),
        "retrieval_table": retrieval_table(metrics),
        "num_images": str(num_images),
        "num_train": _images(sizes["train"]),
        "num_validation": _images(sizes["validation"]),
        "num_evaluated": _images(num_images),
        "results_note": note,
        "encoder": encoder_description(config),
        "retrieval_backbone": str(config.get("retrieval_backbone")),
        "num_parameters": f"{parameters / 1e6:.2f}",
        "image_size": str(config.get("image_size")),
        "repository_name": repository,
        "num_categories": str(len(config.get("text_categories", []))),
        "categories": ", ".join(config.get("text_categories", [])),
        "text_encoder": str(config.get("text_encoder_name_or_path")),
        "repository_origin": known["origin"],
        "data_description": _data_description(data, metrics, split, sizes, "" if sample else known.get("splits", "")),
        "training_summary": training,
        "dataset_citation": known["citation"],
        **license_values(known, dataset_name),
    }


def _numel(shape: list[int]) -> int:
    total = 1
    for n in shape:
        total *= int(n)
    return total


def _is_buffer(name: str) -> bool:
    leaf = name.split(".")[-1]
    return leaf.startswith("text_embeddings_") or leaf in ("running_mean", "running_var", "num_batches_tracked")
