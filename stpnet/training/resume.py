"""What a run needs to stop and continue: the loop's own state (saved in every checkpoint) and a clean stop on
SIGTERM, what a cluster scheduler (Slurm, Kubernetes...) sends before it kills a job.

The SIGTERM handler only notes the request; the loop checks it after each optimizer step, saves a checkpoint there (the
only place where "the next batch" is well defined, see ``trainer.py``) and raises :class:`TrainingInterrupted`, so
``--resume`` continues exactly as after a ``checkpoint_every_steps`` checkpoint. Schedulers wait a grace period
(30 s by default in Slurm) before SIGKILL: one step plus one checkpoint must fit into it.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

import torch


@dataclass
class LoopState:
    """What the loop itself must remember across a resume (saved with ``register_for_checkpointing``)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_dice: float = -1.0
    best_step: int = -1
    evals_without_improvement: int = 0
    stopped_early: bool = False
    loss_sums: dict[str, float] = field(default_factory=dict)
    loss_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# 128 + SIGTERM: what a shell reports for a process that SIGTERM ended, so a scheduler's requeue logic sees the same.
EXIT_STATUS = 128 + signal.SIGTERM


class TrainingInterrupted(Exception):
    """The run stopped on SIGTERM after saving ``checkpoint``; ``--resume`` continues it exactly."""

    def __init__(self, step: int, checkpoint: Any) -> None:
        super().__init__(
            f"stopped by SIGTERM after step {step}; the checkpoint {checkpoint} holds the whole state: continue with "
            "--resume (the same --output-dir and settings)"
        )
        self.step, self.checkpoint = step, checkpoint


class TerminationWatch:
    """While entered, SIGTERM sets :attr:`requested` instead of ending the process (main thread only: signal
    handlers cannot be installed elsewhere, and a run in another thread keeps the default behaviour)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __enter__(self) -> TerminationWatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def agreed(self, accelerator: Any) -> bool:
        """Whether any process was asked to stop: all of them must checkpoint at the same step, or the barriers of
        ``save_state`` would wait for ever. One tiny all-reduce per step, and none on a single process."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
