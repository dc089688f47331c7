"""The training loop: Accelerate end to end (CPU, one or several GPUs, DDP, bf16/fp16, gradient accumulation).

Programmatic entry point (``benchmarks/quality.py`` trains several variants with identical settings)::

    from stpnet.training import load_train_config, run_training
    config = load_train_config("configuration/train/sample-tiny.yaml", ["train.max_steps=50", "output_dir=runs/a"])
    result = run_training(config, model_factory=None)  # or a callable (TrainConfig, ScaleAwareTextRepository) -> model
    result["best_dir"], result["best_val_dice"], result["history"], result["test_metrics"]

A model from ``model_factory`` needs ``forward(pixel_values, labels)`` returning an output with ``.loss`` and
``.logits`` (``(B, 1, H, W)`` mask logits) and ``save_pretrained``/``from_pretrained``. ``text_labels`` is passed
only when ``forward`` accepts it; retrieval metrics are computed only when the output has ``retrieved_indices``.

Resuming continues exactly: a checkpoint (``accelerator.save_state``) holds the model, optimizer, scheduler, RNG
states and the loop's own state (step, epoch, batch position, best score, patience, history), and the data order
and augmentations are functions of (seed, epoch, index) (see ``data.py``). Checkpoints are taken only after an
optimizer step and an accumulation group never spans two epochs, so "the next batch" is always well defined.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from stpnet.data import load_stpnet_dataset
from stpnet.optimize import optimize_for_training
from stpnet.safe_write import write_text
from stpnet.text_repository import ScaleAwareTextRepository
from stpnet.training.augment import TextLabelPolicy
from stpnet.training.checkpoints import check_output_dir, check_resume_config, clear_run, save_best, save_checkpoint
from stpnet.training.config import ConfigError, TrainConfig, resolve_path
from stpnet.training.config_files import as_train_config
from stpnet.training.data import (
    EpochBatchSampler,
    SegmentationDataset,
    load_splits,
    make_loader,
    mask_describer,
    model_inputs,
)
from stpnet.training.evaluation import evaluate_split, validate
from stpnet.training.gradients import clip_gradients, gradient_groups
from stpnet.training.logs import append_log, plot_history, scalar_items, tensorboard_available, write_history
from stpnet.training.model import (
    accepts_text_labels,
    build_stpnet_model,
    load_initial_weights,
    load_repository,
    training_processor,
)
from stpnet.training.resume import LoopState, TerminationWatch, TrainingInterrupted
from stpnet.training.schedule import build_optimizer, build_scheduler

ModelFactory = Callable[[TrainConfig, ScaleAwareTextRepository], torch.nn.Module]
LOSS_PARTS = ("loss", "dice_loss", "bce_loss", "retrieval_loss", "classifier_loss")


def run_training(
    config: TrainConfig | dict | str | os.PathLike,
    model_factory: ModelFactory | None = None,
    resume: bool | str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train, select on validation Dice, save the best model, optionally evaluate it on ``data.test_split``.

    Args:
        config: a :class:`TrainConfig`, its dict form, or a YAML path.
        model_factory: builds the model from the config and the text repository (default: STPNet from
            ``model.preset``; see the module docstring for what another model must provide).
        resume: ``True``/``"latest"`` for the newest checkpoint in ``<output_dir>/checkpoints``, or a folder.
        overwrite: replace an earlier run in ``output_dir`` (only the files a run writes are removed). Without it
            (or ``resume``), an ``output_dir`` that holds a run's results (``best/``, ``checkpoints/``, history
            files) raises :class:`ConfigError` before anything is trained or written.

    Returns:
        ``{"output_dir", "best_dir", "best_val_dice", "best_step", "steps", "stopped_early", "history" (one dict per
        evaluation), "test_metrics" (dict or None), "world_size", "is_main_process"}``; ``test_metrics`` is filled on
        the main process only.
    """
    return Trainer(as_train_config(config), model_factory, resume=resume, overwrite=overwrite).fit()


class Trainer:
    """One training run; :func:`run_training` is the way to use it."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_factory: ModelFactory | None = None,
        resume: bool | str | os.PathLike | None = None,
        overwrite: bool = False,
    ) -> None:
        self.cfg = cfg
        t = cfg.train
        self.output_dir = Path(cfg.output_dir)
        self.tensorboard = t.tensorboard and tensorboard_available()
        _allow_new_precision()
        self.accelerator = Accelerator(
            mixed_precision=t.mixed_precision,
            log_with="tensorboard" if self.tensorboard else None,
            project_dir=str(self.output_dir),
        )
        self.main = self.accelerator.is_main_process
        # Before the data and the model are built, so a refused run fails at once; every process looks before the
        # main one clears anything, so they all take the same decision.
        self.checkpoint = check_output_dir(self.output_dir, resume, overwrite)
        if self.checkpoint is not None:
            check_resume_config(self.checkpoint, cfg.to_yaml())
        self.started = time.time()
        set_seed(t.seed)

        repository = load_repository(cfg)
        if cfg.model.init_from and model_factory is not None:
            raise ConfigError("model.init_from fine-tunes an STPNet checkpoint; it cannot start another model_factory")
        initial = load_initial_weights(cfg)
        splits = load_splits(cfg, repository, self.main)
        self.processor = training_processor(cfg, initial)
        if model_factory is None:
            model = build_stpnet_model(cfg, repository, initial)
            for note in initial.notes if initial else ():
                self.accelerator.print(note)
        else:
            model = model_factory(cfg, repository)
        self.model_class = type(model)
        self.with_text = accepts_text_labels(model)
        model = optimize_for_training(model, self.accelerator.device)
        optimizer = build_optimizer(model, t)

        policy = TextLabelPolicy(cfg.augment.text_labels, mask_describer(repository)) if cfg.augment.enabled else None
        categories = list(repository.categories)
        self.train_set = SegmentationDataset(splits["train"], self.processor, categories, cfg.augment, t.seed, policy)
        self.val_set = SegmentationDataset(splits["validation"], self.processor, categories)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.train_sampler = EpochBatchSampler(len(self.train_set), t.batch_size, t.seed, rank, world)
        eval_batch = cfg.data.eval_batch_size or t.batch_size
        self.val_sampler = EpochBatchSampler(len(self.val_set), eval_batch, 0, rank, world, shuffle=False, pad=False)

        self.batches_per_epoch = self.train_sampler.batches_per_epoch
        self.updates_per_epoch = -(-self.batches_per_epoch // t.gradient_accumulation_steps)
        self.total_steps = t.max_steps or t.epochs * self.updates_per_epoch
        self.scheduler = build_scheduler(optimizer, t, self.updates_per_epoch, self.total_steps)
        # The scheduler is not prepared: Accelerate would step it once per process for each optimizer step.
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.gradient_groups = gradient_groups(self.model, self.accelerator)
        self.state = LoopState()
        self.accelerator.register_for_checkpointing(self.scheduler, self.state)
        self.effective_batch_size = self._check_batch_size()
        if overwrite:
            self._clear_earlier_run()

    def _clear_earlier_run(self) -> None:
        """--overwrite: only now, with the repository, data, model and optimizer built, so that a bad preset or
        dataset leaves the earlier run untouched; nothing of the new run has been written yet. The barriers keep the
        other processes from writing (checkpoint staging) before the main one has cleared."""
        self.accelerator.wait_for_everyone()
        if self.main and clear_run(self.output_dir):
            self.accelerator.print(f"overwrite: removed the earlier run's files from {self.output_dir}")
        self.accelerator.wait_for_everyone()

    def _check_batch_size(self) -> int:
        """Images per optimizer step across processes as the split allows: a batch cannot hold more than a process's
        share of the split, nor an accumulation group more batches than an epoch has (groups never span epochs)."""
        t, world = self.cfg.train, self.accelerator.num_processes
        per_process = -(-len(self.train_set) // world)
        asked = t.batch_size * world * t.gradient_accumulation_steps
        effective = min(t.batch_size, per_process) * world * min(t.gradient_accumulation_steps, self.batches_per_epoch)
        if effective < asked:
            self.accelerator.print(
                f"note: train.batch_size={t.batch_size} x {world} process(es) x {t.gradient_accumulation_steps} "
                f"accumulation step(s) asks for {asked} images per optimizer step, but the {len(self.train_set)} "
                f"training images allow {effective} ({self.batches_per_epoch} batch(es) of at most "
                f"{min(t.batch_size, per_process)} per process and epoch); run.json records effective_global_batch_size"
            )
        return effective

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        acc = self.accelerator
        # SIGTERM from here to the end of the loop ends in a checkpoint and TrainingInterrupted (resume.py).
        with TerminationWatch() as self.termination:
            self._start()
            while self.state.step < self.total_steps and not self.state.stopped_early:
                self._train_epoch()
        self.bar.close()
        result = self._finish()
        if self.tensorboard:
            acc.end_training()
        return result

    def _start(self) -> None:
        acc, t = self.accelerator, self.cfg.train
        checkpoint = self.checkpoint
        if checkpoint is not None:
            acc.load_state(str(checkpoint))
            s = self.state
            acc.print(f"resumed from {checkpoint} at step {s.step} (epoch {s.epoch}, batch {s.batch_in_epoch})")
        if self.tensorboard:
            acc.init_trackers("tensorboard")
        self.run_info = self._run_info(checkpoint)
        if self.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.output_dir / "train_config.yaml", self.cfg.to_yaml())
            append_log(self.output_dir, f"start: {json.dumps(self.run_info)}")
            acc.print(
                f"training {self.total_steps} steps on {acc.num_processes} process(es), {len(self.train_set)} train / "
                f"{len(self.val_set)} validation images, {self.run_info['num_parameters'] / 1e6:.2f} M parameters"
            )
        show = self.main and t.progress
        self.bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", disable=not show)

    def _train_epoch(self) -> None:
        """From the next unconsumed batch to the end of the epoch, or until training must stop."""
        acc, t, state = self.accelerator, self.cfg.train, self.state
        self.train_sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        self.model.train()
        first, accumulation = state.batch_in_epoch, t.gradient_accumulation_steps
        for offset, batch in enumerate(
            make_loader(self.train_set, self.train_sampler, self.cfg.data.num_workers, t.seed)
        ):
            position = first + offset
            group_start = position - position % accumulation
            group_size = min(accumulation, self.batches_per_epoch - group_start)  # the epoch's last group may be short
            sync = position + 1 == group_start + group_size
            with nullcontext() if sync else acc.no_sync(self.model):
                outputs = self.model(**model_inputs(batch, acc.device, self.with_text))
                acc.backward(outputs.loss / group_size)
            for name in LOSS_PARTS:
                value = getattr(outputs, name, None)
                if value is not None:
                    state.loss_sums[name] = state.loss_sums.get(name, 0.0) + float(value.detach()) / group_size
            if sync and self._optimizer_step(position):
                return

    def _optimizer_step(self, position: int) -> bool:
        """Step, then evaluate / checkpoint when due. Returns True when the epoch loop must end."""
        acc, t, state = self.accelerator, self.cfg.train, self.state
        if t.max_grad_norm:
            norms = clip_gradients(acc, self.model, self.gradient_groups, t.max_grad_norm, t.clip_retrieval_separately)
            for name, value in norms.items():  # averaged over the steps between evaluations, like the losses
                state.loss_sums[name] = state.loss_sums.get(name, 0.0) + value
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.loss_steps += 1
        state.batch_in_epoch = position + 1
        epoch_end = state.batch_in_epoch == self.batches_per_epoch
        if epoch_end:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        self.bar.update(1)
        last = state.step >= self.total_steps
        due = state.step % t.eval_every_steps == 0 if t.eval_every_steps else epoch_end
        if due or last:
            row = self._evaluate()
            self.bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_dice=f"{row['val_dice']:.4f}")
            self.model.train()
        stop = last or state.stopped_early
        interrupted = not stop and self.termination.agreed(acc)
        if stop or interrupted or (t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0):
            saved = save_checkpoint(acc, self.output_dir, state.step, t.keep_checkpoints, self.cfg.to_yaml())
            if self.main:
                plot_history(state.history, self.output_dir / "training_curves.png")
            if interrupted:
                self.bar.close()
                error = TrainingInterrupted(state.step, saved)
                if self.main:
                    append_log(self.output_dir, f"interrupted: {error}")
                raise error
        return stop or epoch_end

    def _evaluate(self) -> dict[str, Any]:
        """Validate, log a history row, save the best model (validation Dice only), track early stopping."""
        acc, state = self.accelerator, self.state
        metrics = validate(acc, self.model, self.val_set, self.val_sampler, self.with_text)
        steps = max(state.loss_steps, 1)
        row = {
            "step": state.step,
            "epoch": round(state.step / self.updates_per_epoch, 4),
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": float("nan"),
            **{f"train_{k}": v / steps for k, v in state.loss_sums.items()},
            **metrics,
        }
        state.loss_sums, state.loss_steps = {}, 0
        row["is_best"] = metrics["val_dice"] > state.best_dice
        if row["is_best"]:
            state.best_dice, state.best_step, state.evals_without_improvement = metrics["val_dice"], state.step, 0
            if self.main:
                # the data sizes travel with the checkpoint, so its model card can say what the numbers rest on
                sizes = {"train_examples": len(self.train_set), "validation_examples": len(self.val_set)}
                save_best(
                    acc.unwrap_model(self.model), self.processor, self.output_dir, {**row, **sizes}, self.cfg.to_yaml()
                )
        else:
            state.evals_without_improvement += 1
            patience = self.cfg.train.early_stopping_patience
            if patience and state.evals_without_improvement >= patience:
                state.stopped_early = True
                acc.print(f"early stopping: no better validation Dice in {patience} evaluations")
        state.history.append(row)
        if self.main:
            write_history(state.history, self.output_dir)
            append_log(self.output_dir, json.dumps(row))
        if self.tensorboard:
            acc.log(scalar_items(row), step=state.step)
        acc.wait_for_everyone()
        return row

    def _run_info(self, checkpoint: Path | None) -> dict[str, Any]:
        acc, t = self.accelerator, self.cfg.train
        ranks = acc.gather(torch.tensor([acc.process_index], device=acc.device)).cpu().tolist()
        return {
            "world_size": acc.num_processes,
            "ranks": sorted(ranks),  # gathered from every process: proof that they really ran together
            "device": str(acc.device),
            "distributed_type": str(acc.distributed_type),
            "mixed_precision": acc.mixed_precision,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "global_batch_size": t.batch_size * acc.num_processes * t.gradient_accumulation_steps,
            "effective_global_batch_size": self.effective_batch_size,
            "batches_per_epoch": self.batches_per_epoch,
            "updates_per_epoch": self.updates_per_epoch,
            "total_steps": self.total_steps,
            "num_parameters": sum(p.numel() for p in acc.unwrap_model(self.model).parameters()),
            "train_examples": len(self.train_set),
            "validation_examples": len(self.val_set),
            "resumed_from": str(checkpoint) if checkpoint else None,
        }

    def _finish(self) -> dict[str, Any]:
        """Final records; the selected model is reloaded from ``best/`` and scored once on the test split."""
        acc, state, cfg = self.accelerator, self.state, self.cfg
        best_dir = self.output_dir / "best"
        test_metrics = None
        if self.main:
            write_history(state.history, self.output_dir)
            plot_history(state.history, self.output_dir / "training_curves.png")
            if cfg.data.test_split is not None and best_dir.is_dir():
                test_metrics = self._evaluate_best(best_dir)
        acc.wait_for_everyone()
        result = {
            "output_dir": str(self.output_dir),
            "best_dir": str(best_dir),
            "best_val_dice": state.best_dice,
            "best_step": state.best_step,
            "steps": state.step,
            "stopped_early": state.stopped_early,
            "history": state.history,
            "test_metrics": test_metrics,
            "world_size": acc.num_processes,
            "is_main_process": self.main,
        }
        if self.main:
            summary = {**self.run_info, **{k: v for k, v in result.items() if k not in ("history", "is_main_process")}}
            summary["wall_time_s"] = round(time.time() - self.started, 2)
            write_text(self.output_dir / "run.json", json.dumps(summary, indent=2) + "\n")
            append_log(self.output_dir, f"end: best validation dice {state.best_dice:.4f} at step {state.best_step}")
            acc.print(f"best validation Dice {state.best_dice:.4f} at step {state.best_step}; model: {best_dir}")
        return result

    def _evaluate_best(self, best_dir: Path) -> dict[str, Any]:
        cfg = self.cfg
        dataset = load_stpnet_dataset(resolve_path(cfg.data.dataset), load_repository(cfg), progress=False)
        model = self.model_class.from_pretrained(best_dir)
        extra = {"model": str(best_dir), "dataset": cfg.data.dataset, "split": cfg.data.test_split}
        batch_size = cfg.data.eval_batch_size or cfg.train.batch_size
        output = self.output_dir / "test"
        device = self.accelerator.device
        return evaluate_split(
            model, self.processor, dataset[cfg.data.test_split], output, batch_size, device, extra=extra
        )


# ---------------------------------------------------------------------------- helpers
def _allow_new_precision() -> None:
    """Accelerate keeps one global state per process and refuses a second Accelerator with another mixed precision;
    single-process callers (benchmarks, tests) train several configurations in one process, so start afresh.
    Under a multi-process launch the launcher's state stays."""
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
