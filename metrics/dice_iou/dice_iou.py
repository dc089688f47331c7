"""Dice and IoU for binary lesion masks, as an ``evaluate`` metric that loads offline from this folder.

    import evaluate
    metric = evaluate.load("./metrics/dice_iou")           # a local path: no Hub access
    metric.add_batch(predictions=[pred_mask, ...], references=[true_mask, ...])
    metric.compute()   # {"dice", "iou", "micro_dice", "micro_iou", "num_images"}

The numbers come from ``stpnet.metrics`` (the implementation training and ``hub_scripts/evaluate.py``
use), so this module needs the ``stpnet`` package importable (``pip install -e .`` or the repository root on
``sys.path``).
"""

import datasets
import evaluate
import numpy as np

from stpnet.metrics import (
    counts_of_masks,
    dice_from_counts,
    iou_from_counts,
    retrieval_accuracy,
    segmentation_scores,
)

_DESCRIPTION = """
Per-image (macro) Dice and IoU averaged over images, as the STPNet paper reports them, plus global (micro) Dice and
IoU over all pixels pooled. Masks are 2-D arrays (any value > 0 is lesion) and may differ in size from image to
image; a prediction must match its reference's size. Empty masks: when prediction and reference are both empty
the image scores 1 (a correct "no lesion"); when exactly one is empty it scores 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of 2-D binary masks (numpy arrays or nested lists), one per image.
    references: list of 2-D binary masks of the same sizes.
    return_per_image (bool, default False): also return "per_image_dice" and "per_image_iou" lists.
    retrieved_indices, text_labels (optional, (N, K) integer arrays): retrieved and true entry per text category
        (-100 where unknown); adds "retrieval_accuracy" per category.
    categories (optional list of K names): keys of "retrieval_accuracy".
Returns:
    dice, iou: per-image means in [0, 1]; micro_dice, micro_iou: pooled over pixels; num_images.
Examples:
    >>> metric = evaluate.load("./metrics/dice_iou")
    >>> metric.compute(predictions=[[[1, 1], [0, 0]]], references=[[[1, 0], [0, 0]]])["dice"]
    0.6666666666666666
"""

_CITATION = """
@article{shan2025stpnet,
  title   = {STPNet: Scale-aware Text Prompt Network for Medical Image Segmentation},
  author  = {Shan, Dandan and Li, Zihan and others},
  journal = {IEEE Transactions on Image Processing},
  year    = {2025},
  note    = {arXiv:2504.01561}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DiceIou(evaluate.Metric):
    """Per-image and pooled Dice/IoU of binary masks (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        mask = datasets.Sequence(datasets.Sequence(datasets.Value("uint8")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": mask, "references": mask}),
            reference_urls=["https://arxiv.org/abs/2504.01561"],
        )

    def _compute(
        self,
        predictions,
        references,
        return_per_image: bool = False,
        retrieved_indices=None,
        text_labels=None,
        categories=None,
    ) -> dict:
        counts = counts_of_masks(
            (np.asarray(p, dtype=np.uint8) for p in predictions), (np.asarray(r, dtype=np.uint8) for r in references)
        )
        result = segmentation_scores(counts)
        if return_per_image:
            result["per_image_dice"] = dice_from_counts(counts).tolist()
            result["per_image_iou"] = iou_from_counts(counts).tolist()
        if retrieved_indices is not None and text_labels is not None:
            result["retrieval_accuracy"] = retrieval_accuracy(retrieved_indices, text_labels, categories)
        return result
