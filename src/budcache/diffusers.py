"""Compatibility name of :mod:`budcache.pipelines`: apply a cache policy to a diffusers pipeline.

``import budcache.diffusers as bd`` keeps working (``bd.apply``, ``bd.compile``,
``bd.remove``, ``bd.PeerHandle``); new code may import :mod:`budcache.pipelines`, whose name
does not shadow the ``diffusers`` package in readers' minds.
"""

from __future__ import annotations

from .pipelines import PeerHandle, apply, compile, remove

__all__ = ["PeerHandle", "apply", "compile", "remove"]
