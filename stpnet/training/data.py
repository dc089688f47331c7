"""Training data: STPNet dataset rows → model inputs, in a deterministic, step-indexed, resumable order.

Order: epoch ``e`` visits a permutation of the examples drawn from ``(seed, e)``; with several processes the
permutation is padded to a multiple of the process count (as ``DistributedSampler``) and rank ``r`` takes every
``world``-th example. Each batch is a list of ``(epoch, index)`` keys, and the dataset derives the example's
augmentation from ``(seed, epoch, index)``. So the batches of a run are a pure function of (seed, epoch, batch
position): a resumed run starts the epoch's sampler at the first batch not yet consumed and sees exactly the
batches an uninterrupted run would have seen, whatever the number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from modeling_stpnet.image_processing_stpnet import STPNetImageProcessor
from stpnet.data import MaskDescriber, load_stpnet_dataset
from stpnet.data.hub import ID_COLUMNS
from stpnet.data.io import DataError
from stpnet.text_repository import ScaleAwareTextRepository
from stpnet.training.augment import TextLabelPolicy, augment_pair, sample_generator
from stpnet.training.config import AugmentSection, ConfigError, TrainConfig, resolve_path


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys for one process: its share of the epoch's seeded permutation.

    Args:
        num_examples: size of the split.
        batch_size: examples per batch and process.
        seed: seed of the per-epoch permutations.
        rank, world_size: this process and the number of processes.
        shuffle: permute each epoch (training) or keep the split's order (evaluation).
        pad: repeat examples so every process gets the same number of batches (training under DDP needs equal
            step counts); evaluation passes False and removes nothing, since the gathered rows carry their index.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        pad: bool = True,
    ) -> None:
        if num_examples < 1:
            raise ValueError("The split is empty")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.pad = pad
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (its permutation and augmentations) and the first batch to yield (for resuming)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def _shard(self) -> list[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples).tolist()
        else:
            order = list(range(self.num_examples))
        if self.pad:
            total = math.ceil(self.num_examples / self.world_size) * self.world_size
            order += order[: total - len(order)]
        return order[self.rank :: self.world_size]

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self._shard()) / self.batch_size)

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        shard = self._shard()
        for b in range(self.start_batch, math.ceil(len(shard) / self.batch_size)):
            yield [(self.epoch, i) for i in shard[b * self.batch_size : (b + 1) * self.batch_size]]


class SegmentationDataset(Dataset):
    """Rows of an STPNet split → ``pixel_values``, ``labels``, ``text_labels`` and ``index`` tensors.

    Images and masks go through ``STPNetImageProcessor`` (resize, normalise, binarise); augmentation, when given,
    runs on its output with the random stream of ``(seed, epoch, index)``.
    """

    def __init__(
        self,
        split: datasets.Dataset,
        processor: STPNetImageProcessor,
        categories: list[str],
        augment: AugmentSection | None = None,
        seed: int = 0,
        label_policy: TextLabelPolicy | None = None,
    ) -> None:
        self.name = f"split {str(split.split)!r}" if split.split is not None else "the split"
        if len(split) == 0:
            raise DataError(f"{self.name} has no rows; training and evaluation need at least one example")
        required = ["image", "mask", *categories]
        missing = [c for c in required if c not in split.column_names]
        if missing:
            raise DataError(
                f"{self.name} lacks column(s) {missing}: present {split.column_names}, required {required} (image, "
                "mask and one label column per text category)"
            )
        self.split = split
        self.id_column = next((c for c in ID_COLUMNS if c in split.column_names), None)
        self.processor = processor
        self.categories = list(categories)
        self.augment = augment if augment is not None and augment.enabled else None
        self.seed = seed
        self.label_policy = label_policy
        # Rotations bring in black pixels, as the authors' zero padding did before normalisation.
        if processor.do_normalize:
            self.fill = -torch.tensor(processor.image_mean) / torch.tensor(processor.image_std)
        else:
            self.fill = torch.zeros(3)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        row = self.split[int(index)]
        # the processor numbers images within its call (always 0 here); the stored row is what finds the example
        where = f"row {_stored_row(self.split, int(index))}"
        where += (f" ({self.id_column} {row[self.id_column]!r})" if self.id_column else "") + f" of {self.name}"
        image, mask = row["image"], row["mask"]
        if hasattr(image, "size") and hasattr(mask, "size") and image.size != mask.size:
            raise DataError(
                f"{where}: the mask is {mask.size[0]}x{mask.size[1]} but its image is {image.size[0]}x{image.size[1]} "
                "(width x height); a mask must have its image's size"
            )
        try:
            inputs = self.processor(image, segmentation_maps=mask)
        except ValueError as error:
            raise DataError(f"{where}: {error}") from error
        pixel_values, labels = inputs["pixel_values"][0], inputs["labels"][0]
        text_labels = torch.tensor([int(row[c]) for c in self.categories], dtype=torch.long)
        if self.augment is not None:
            result = augment_pair(
                pixel_values, labels, self.augment, sample_generator(self.seed, epoch, index), self.fill
            )
            pixel_values, labels = result.pixel_values, result.labels
            if self.label_policy is not None:
                text_labels = self.label_policy(text_labels, result)
        return {
            "pixel_values": pixel_values,
            "labels": labels,
            "text_labels": text_labels,
            "index": torch.tensor(int(index)),
        }


def _stored_row(split: datasets.Dataset, index: int) -> int:
    """The row of ``split``'s stored table: ``select`` (the validation carve) renumbers rows but keeps a mapping."""
    mapping = getattr(split, "_indices", None)
    return int(mapping.column(0)[index].as_py()) if mapping is not None else index


def make_loader(dataset: SegmentationDataset, sampler: EpochBatchSampler, num_workers: int, seed: int) -> DataLoader:
    """A DataLoader over ``sampler``'s batches.

    Its own generator keeps the loader from drawing its worker base seed from the global torch RNG, which a
    resumed run restores from the checkpoint: the global stream then stays identical to an uninterrupted run's.
    """
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def carve_validation_split(
    split: datasets.Dataset, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Seeded (train, validation) split of a train split, when the selection split must come from train."""
    if len(split) < 2:
        raise ValueError(f"Cannot carve a validation split out of {len(split)} training example(s)")
    count = min(max(1, round(fraction * len(split))), len(split) - 1)
    order = np.random.default_rng(seed).permutation(len(split))
    validation, train = sorted(order[:count].tolist()), sorted(order[count:].tolist())
    return split.select(train), split.select(validation)


def model_inputs(batch: dict[str, Any], device: torch.device, with_text: bool) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``model.forward`` from a collated batch."""
    inputs = {"pixel_values": batch["pixel_values"].to(device), "labels": batch["labels"].to(device)}
    if with_text:
        inputs["text_labels"] = batch["text_labels"].to(device)
    return inputs


def mask_describer(repository: ScaleAwareTextRepository) -> MaskDescriber | None:
    """What writes the descriptions of masks that come without text: the repository's own, when it has one."""
    return MaskDescriber(repository) if repository.auto_description else None


def load_splits(cfg: TrainConfig, repository: ScaleAwareTextRepository, main: bool) -> dict[str, Any]:
    """The training and validation splits the config names (validation carved from train when it says so)."""
    d = cfg.data
    dataset = load_stpnet_dataset(resolve_path(d.dataset), repository, progress=main)
    wanted = [d.train_split] + ([] if d.validation_from_train else [d.validation_split])
    wanted += [d.test_split] if d.test_split is not None else []
    missing = [s for s in wanted if s not in dataset]
    if missing:
        raise ConfigError(
            f"data.dataset={d.dataset!r} has splits {list(dataset)}, not {missing} (set data.train_split / "
            "data.validation_split / data.test_split, or data.validation_from_train to carve validation from train)"
        )
    if d.validation_from_train:
        train, validation = carve_validation_split(dataset[d.train_split], d.validation_from_train, cfg.train.seed)
        return {"train": train, "validation": validation}
    return {"train": dataset[d.train_split], "validation": dataset[d.validation_split]}
