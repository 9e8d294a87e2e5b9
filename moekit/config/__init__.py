"""Typed settings for each step (pydantic, extra keys forbidden so typos in recipes fail loudly).

Every default lives here once: the commands' options take theirs from these classes
(:func:`default_of`), and so does their help text where it states one.
"""

from moekit.config.base import (
    DEFAULT_AUX_COEF,
    DEFAULT_CAPACITY_FACTOR,
    DEFAULT_TEXT_FIELD,
    DEFAULT_Z_COEF,
    DEVICE_HELP,
    REPORT_SAMPLE_TOKENS,
    default_of,
)
from moekit.config.mix import GrowConfig, MixConfig, UpcycleSettings
from moekit.config.reading import EvalConfig, GenerateConfig, InspectConfig
from moekit.config.training import HyperMoESettings, LoopSettings, TrainConfig, TuneConfig

__all__ = [
    "DEFAULT_AUX_COEF",
    "DEFAULT_CAPACITY_FACTOR",
    "DEFAULT_TEXT_FIELD",
    "DEFAULT_Z_COEF",
    "DEVICE_HELP",
    "REPORT_SAMPLE_TOKENS",
    "EvalConfig",
    "GenerateConfig",
    "GrowConfig",
    "HyperMoESettings",
    "InspectConfig",
    "LoopSettings",
    "MixConfig",
    "TrainConfig",
    "TuneConfig",
    "UpcycleSettings",
    "default_of",
]
