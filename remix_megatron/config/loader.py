"""Strict YAML loading, dotted CLI overrides, cross-section validation and YAML output.

YAML is data only: ``yaml.safe_load`` into plain mappings, every key checked against the
dataclass tree (an unknown key is an error naming the nearest valid one), then OmegaConf's
structured configs do the type checks and conversions, and the frozen dataclasses are built
(which runs each section's own validation).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from remix_megatron.config.presets import MODEL_PRESETS, model_values_from_hf_dir
from remix_megatron.config.schema import ConfigError, ExperimentConfig
from remix_megatron.fileio import atomic_write_text


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_keys(data: Mapping[str, Any], cls: type, path: str, source: str) -> None:
    """Raise ConfigError for the first key in ``data`` that ``cls`` does not have."""
    types = _field_types(cls)
    for key, value in data.items():
        full = f"{path}{key}"
        if key not in types:
            close = difflib.get_close_matches(str(key), list(types), n=1, cutoff=0.5)
            hint = f"; did you mean '{path}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{full}' in {source}{hint} Valid keys here: {', '.join(types)}")
        if dataclasses.is_dataclass(types[key]):
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{full}' in {source} must be a mapping of {types[key].__name__} keys, "
                                  f"got {type(value).__name__}")
            _check_keys(value, types[key], f"{full}.", source)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (yaml keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice "
                                  "(YAML would keep the last silently); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str, source: str) -> Any:
    """Plain data from YAML text (duplicate keys refused); ``source`` names it in errors."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source} is not valid YAML: {error}") from None


def _refuse_interpolation(data: Any, path: str, source: str) -> None:
    """YAML is data only: OmegaConf would resolve ``${...}`` (``${oc.env:HOME}`` reads the environment)."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            _refuse_interpolation(value, f"{path}{key}.", source)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            _refuse_interpolation(value, f"{path}{index}.", source)
    elif isinstance(data, str) and "${" in data:
        raise ConfigError(f"'{path[:-1]}' in {source} holds {data!r}: interpolation (${{...}}) is not supported, "
                          "configs are data only; write the value itself")


def _field_type(key: str) -> Any:
    """The declared type of a dotted key (None when it names no field: _check_keys reports that)."""
    cls: Any = ExperimentConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls) or part not in _field_types(cls):
            return None
        cls = _field_types(cls)[part]
    return cls


def _override_value(key: str, text: str) -> Any:
    """A string field takes the text as written (``data.template=Q: {problem}``); others parse as YAML."""
    if _field_type(key) is str:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}={text!r}: not a valid value ({str(error).splitlines()[0]})") from None


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict; values typed by their field (see ``_override_value``)."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, _, text = item.partition("=")
        if "=" not in item or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. parallel.tensor_parallel=2)")
        *parents, leaf = key.split(".")
        node = parsed
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is set to a value and used as a section")
        node[leaf] = _override_value(key, text)
    _check_keys(parsed, ExperimentConfig, "", "command-line overrides")
    _refuse_interpolation(parsed, "", "command-line overrides")
    return parsed


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config file into plain data, checking every key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    data = load_yaml_text(path.read_text(), str(path))
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must hold a mapping of sections at top level, got {type(data).__name__}")
    _check_keys(data, ExperimentConfig, "", str(path))
    _refuse_interpolation(data, "", str(path))
    return data


def build_config(*layers: Mapping[str, Any]) -> ExperimentConfig:
    """Merge data layers (later wins) over the schema defaults and the chosen model preset."""
    preset = hf_path = ""
    for layer in layers:
        preset = layer.get("model", {}).get("preset", preset)
        hf_path = layer.get("model", {}).get("hf_path", hf_path)
    try:
        preset_values = dict(MODEL_PRESETS.get(preset)) if preset else {}
    except ValueError as error:
        raise ConfigError(f"model.preset: {error}") from None
    if hf_path:
        preset_values.update(model_values_from_hf_dir(str(hf_path)))
    merged = OmegaConf.structured(ExperimentConfig)
    try:
        for layer in ({"model": preset_values}, *layers):
            merged = OmegaConf.merge(merged, OmegaConf.create(dict(layer)))
        return OmegaConf.to_object(merged)
    except oc_errors.MissingMandatoryValue as error:
        key = error.full_key or "?"
        raise ConfigError(f"'{key}' is required and has no default: set it in the YAML or with {key}=..."
                          + (f" (or choose a model.preset: {', '.join(MODEL_PRESETS.names())})"
                             if key.startswith("model") else "")) from None
    except oc_errors.OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        raise ConfigError(f"invalid value for '{error.full_key}': {message}") from None


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment config from YAML (or defaults when ``path`` is None) plus overrides."""
    layers = [read_yaml(path)] if path is not None else []
    return build_config(*layers, parse_overrides(overrides))


def layout_errors(cfg: ExperimentConfig, world_size: int) -> list[str]:
    """What keeps the model and batch from splitting over ``world_size`` ranks (empty when they do)."""
    par, model, trainer = cfg.parallel, cfg.model, cfg.trainer
    tp, pp, vpp = par.tensor_parallel, par.pipeline_parallel, par.virtual_pipeline
    errors = []
    if world_size % (tp * pp):
        errors.append(f"world size {world_size} is not divisible by tensor_parallel*pipeline_parallel="
                      f"{tp * pp} (tensor_parallel={tp}, pipeline_parallel={pp})")
    for name in ("num_attention_heads", "num_query_groups", "vocab_size", "ffn_hidden_size"):
        value = getattr(model, name)
        if value % tp:
            errors.append(f"model.{name}={value} is not divisible by parallel.tensor_parallel={tp}")
    if model.num_layers % (pp * vpp):
        errors.append(f"model.num_layers={model.num_layers} is not divisible by "
                      f"parallel.pipeline_parallel*virtual_pipeline={pp * vpp}")
    data_parallel = max(world_size // (tp * pp), 1)
    if not errors and trainer.global_batch_size % (trainer.micro_batch_size * data_parallel):
        errors.append(f"trainer.global_batch_size={trainer.global_batch_size} is not divisible by "
                      f"micro_batch_size*data_parallel={trainer.micro_batch_size * data_parallel}")
    if trainer.seq_length > model.max_position_embeddings:
        errors.append(f"trainer.seq_length={trainer.seq_length} exceeds "
                      f"model.max_position_embeddings={model.max_position_embeddings}")
    return errors


def validate_layout(cfg: ExperimentConfig, world_size: int) -> int:
    """Check that the model and batch split over ``world_size`` ranks; return the DP size."""
    errors = layout_errors(cfg, world_size)
    if errors:
        raise ConfigError("invalid parallel layout:\n  " + "\n  ".join(errors))
    return max(world_size // cfg.parallel.model_parallel_size, 1)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig, header: Mapping[str, Any] | None = None) -> str:
    """The config as loadable YAML; ``header`` values (derived facts) go in leading comments."""
    lines = [f"# {key}: {value}" for key, value in (header or {}).items()]
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    return "\n".join(lines + [body])


def save_config(cfg: ExperimentConfig, path: str | os.PathLike, header: Mapping[str, Any] | None = None) -> Path:
    """Write ``to_yaml`` atomically (temp file + rename) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, to_yaml(cfg, header))


def _reference_lines(cls: type, defaults: object | None, indent: str) -> list[str]:
    """YAML lines for ``cls``; ``defaults`` is an instance built by a section's factory, if any."""
    lines: list[str] = []
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        lines.append(f"{indent}# {f.metadata['doc']}")
        if dataclasses.is_dataclass(types[f.name]):
            nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            lines.append(f"{indent}{f.name}:")
            lines.extend(_reference_lines(types[f.name], nested, indent + "  "))
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            lines.append(f"{indent}{f.name}: ???  # required")
            continue
        value = yaml.safe_dump(default, default_flow_style=True).removesuffix("...\n").strip()
        lines.append(f"{indent}{f.name}: {value}")
    return lines


def reference_yaml() -> str:
    """Every key with its doc and default ('???' = required); configs/reference.yaml holds it."""
    head = ["# Reference of every config key, its meaning and default. Generated by",
            "# `remix-megatron config reference`; a test keeps it in sync with the code.",
            "# '???' marks a required key (model keys are filled by model.preset)."]
    return "\n".join(head + _reference_lines(ExperimentConfig, None, "")) + "\n"
