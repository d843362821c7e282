"""Stage 2: cache-aware schedule alignment (learn the sigmas of a fixed cache mask), its control on the
plain K-step sampler ("Original-Opt"), and joint search <-> alignment."""

from __future__ import annotations

from ..stages import make_callable
from .job import AlignJob, run_align
from .params import PARAMETRISATIONS, LD3Schedule, OffsetSchedule, Schedule, SegmentSchedule, make_schedule
from .trainer import (
    AlignConfig,
    AlignResult,
    CheckpointedDenoiser,
    align,
    align_plain,
    lr_factor,
    policy_loss,
    student_sampler,
)

make_callable(__name__, f"{__name__}.job", "run_align")  # budcache.align(out, policy=..., ...)

__all__ = [
    "AlignJob", "run_align", "AlignConfig", "AlignResult", "CheckpointedDenoiser", "LD3Schedule", "OffsetSchedule",
    "PARAMETRISATIONS",
    "Schedule", "SegmentSchedule", "align", "align_plain", "lr_factor", "make_schedule", "policy_loss",
    "student_sampler",
]
