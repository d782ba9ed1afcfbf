"""The train and annotate configs of SPEC §3 as pydantic models, YAML loading and ``--set`` overrides.

Every model forbids unknown keys; :func:`load_config` turns any validation failure into one
:class:`~raycv.errors.ConfigError` naming the field, the value that came and the fix.
"""

from raycv.config.annotate import AnnotateConfig, GeoConfig, ModelSourceConfig, PreprocessConfig, TileConfig
from raycv.config.base import StorageConfig, Strict
from raycv.config.loading import apply_override, build_config, config_to_dict, load_config
from raycv.config.train import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    OutputConfig,
    ScalingConfig,
    TrackingConfig,
    TrainConfig,
    TrainParams,
)

__all__ = [
    "AnnotateConfig",
    "AugmentConfig",
    "DataConfig",
    "GeoConfig",
    "ModelConfig",
    "ModelSourceConfig",
    "OutputConfig",
    "PreprocessConfig",
    "ScalingConfig",
    "StorageConfig",
    "Strict",
    "TileConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainParams",
    "apply_override",
    "build_config",
    "config_to_dict",
    "load_config",
]
