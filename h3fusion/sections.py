"""The base of every profile section, and of the judge settings each dimension declares (`Dimension.judge_settings`).

Kept apart from `h3fusion.config_sections` so that a dimension's module can declare its own section without
importing the profile (which reads the registered dimensions)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    HASHED_WHEN_SET: ClassVar[tuple[str, ...]] = ()
    """Keys added after artifacts existed: they enter the artifacts' hashes only when not None, so that artifacts
    built before the key existed stay valid."""


class JudgeSettings(Section):
    """A dimension's section of `judges` (``judges.<dimension>``): which judge scores it and that judge's settings.
    A dimension subclasses it with its judges' choices and settings."""

    judge: str = "offline"
    """`offline` (a proxy built and validated here) or the paper's judge, by the name the dimension gives it."""
