"""Model families as data: one :class:`Family` record per diffusers pipeline class.

A record says how budcache drives that pipeline's model outside the
pipeline's own loop: the denoiser adapter, the initial latents, the
scheduler's resolution shift, prompt encoding and the VAE's latent
normalisation. :class:`budcache.problems.pipeline.PipelineProblem` looks the
pipeline's class up in :data:`FAMILIES`; a class without a record is a clear
error, never another family's code. A new family is one module here with a
``FAMILY`` record, plus one row in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from . import flux, flux2, hunyuanvideo15, qwenimage, sd3, wan, zimage
from .record import Family, PipelineView

#: Every family budcache's search, align and compare drive, by pipeline class name.
FAMILIES: dict[str, Family] = {f.pipeline: f for f in (flux.FAMILY, sd3.FAMILY, wan.FAMILY, flux2.FAMILY,
                                                       qwenimage.FAMILY, zimage.FAMILY, hunyuanvideo15.FAMILY)}


def family_of(pipe: Any) -> Family:
    """The record for ``pipe``'s class; a clear error naming the supported classes otherwise."""
    cls = type(pipe).__name__
    if cls not in FAMILIES:
        raise ConfigError(f"pipeline {cls} is not supported by search, align and compare (no budcache family "
                          f"record); supported: {sorted(FAMILIES)} (budcache.diffusers.apply works on any "
                          "pipeline whose transformer blocks diffusers knows)")
    return FAMILIES[cls]


__all__ = ["FAMILIES", "Family", "PipelineView", "family_of"]
