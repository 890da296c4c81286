"""Experiment configuration: schema, model presets, strict YAML loading and validation."""

from remix_megatron.config.loader import (
    build_config,
    config_to_dict,
    layout_errors,
    load_config,
    load_yaml_text,
    parse_overrides,
    read_yaml,
    reference_yaml,
    save_config,
    to_yaml,
    validate_layout,
)
from remix_megatron.config.presets import MODEL_PRESETS
from remix_megatron.config.schema import (
    AlgorithmConfig,
    ClusterConfig,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RolloutConfig,
    StoreConfig,
    TrainerConfig,
)

__all__ = [
    "AlgorithmConfig", "ClusterConfig", "ConfigError", "DataConfig", "ExperimentConfig", "ModelConfig",
    "OptimizerConfig", "ParallelConfig", "RolloutConfig", "StoreConfig", "TrainerConfig",
    "MODEL_PRESETS", "build_config", "config_to_dict", "layout_errors", "load_config", "load_yaml_text",
    "parse_overrides", "read_yaml", "reference_yaml", "save_config", "to_yaml", "validate_layout",
]
