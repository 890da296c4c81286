"""HuggingFace <-> Megatron weights for the registered model families (``remix_megatron.families``).

Each family's declarative two-way name map (``ModelFamily.layer_rows`` ...) plus two tensor transforms:

- ``qkv``: HF's separate q/k/v projections <-> Megatron's fused ``linear_qkv``, laid out per
  query group as ``[q heads of the group, k, v]``;
- ``gate_up``: HF's ``gate_proj`` and ``up_proj`` <-> Megatron's ``linear_fc1 = [gate; up]``.

Megatron names are those of a single-process (TP=1, PP=1) GPTModel with the local spec;
``models.sharding`` moves them to and from TP/PP shards. The TransformerEngine spec fuses
the two norms into the following linear layers (``TE_ALIASES``). The critic is exported as
``<Family>ForTokenClassification`` with one label: its per-token logits are the values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from remix_megatron.config import ConfigError, ModelConfig
from remix_megatron.config.presets import model_values_from_hf_config
from remix_megatron.families import MODEL_FAMILIES

TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


class ConversionError(ConfigError):
    """Weights or configs that do not fit the model; the message lists what is missing or wrong."""


@dataclass(frozen=True)
class Row:
    megatron: str
    hf: tuple[str, ...]
    transform: str


def name_map(model: ModelConfig, *, critic: bool = False) -> list[Row]:
    """Every tensor of the model as (Megatron name, HF names, transform), from its family's map."""
    family = MODEL_FAMILIES.get(model.family)
    rows = []
    for layer in range(model.num_layers):
        for megatron, hf, transform in family.layer_rows:
            if megatron.endswith("linear_qkv.bias") and not model.add_qkv_bias:
                continue
            rows.append(Row(megatron.format(i=layer), tuple(n.format(i=layer) for n in hf), transform))
    heads = family.critic_head if critic else (() if model.tie_word_embeddings else family.actor_head)
    rows += [Row(m, hf, t) for m, hf, t in family.global_rows + heads]
    return rows


def canonical_megatron_name(name: str) -> str:
    """Map TransformerEngine-spec names onto the local-spec names the map uses."""
    for te_suffix, local_suffix in TE_ALIASES.items():
        if name.endswith(te_suffix):
            return name[: -len(te_suffix)] + local_suffix
    return name


def _qkv_split_sizes(model: ModelConfig) -> tuple[int, int, int]:
    per_group = model.num_attention_heads // model.num_query_groups
    return per_group * model.head_dim, model.head_dim, model.head_dim


def fuse(row: Row, tensors: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    """HF tensors of one row -> the Megatron tensor."""
    if row.transform == "copy":
        return tensors[0]
    if row.transform == "gate_up":
        return torch.cat(tensors, dim=0)
    q, k, v = tensors
    groups = model.num_query_groups
    trailing = q.shape[1:]
    parts = [t.reshape(groups, -1, *trailing) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *trailing)


def split(row: Row, tensor: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    """The Megatron tensor of one row -> its HF tensors."""
    if row.transform == "copy":
        return [tensor]
    if row.transform == "gate_up":
        return list(tensor.chunk(2, dim=0))
    trailing = tensor.shape[1:]
    grouped = tensor.reshape(model.num_query_groups, -1, *trailing)
    q, k, v = torch.split(grouped, list(_qkv_split_sizes(model)), dim=1)
    return [part.reshape(-1, *trailing).contiguous() for part in (q, k, v)]


# ----------------------------------------------------------------------------- HF configs


def hf_config_from_model(model: ModelConfig, *, critic: bool, dtype: torch.dtype,
                         base: Mapping | None = None) -> dict:
    """An HF ``config.json`` for ``model`` (starting from ``base``, the source model's, when known)."""
    family = MODEL_FAMILIES.get(model.family)
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, "float32")
    config = dict(base or {})
    config.update(
        architectures=[family.critic_architecture if critic else family.actor_architecture],
        model_type=family.model_type,
        hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, num_key_value_heads=model.num_query_groups,
        vocab_size=model.vocab_size, max_position_embeddings=model.max_position_embeddings,
        rope_theta=model.rotary_base, rms_norm_eps=model.norm_epsilon, hidden_act="silu",
        tie_word_embeddings=model.tie_word_embeddings and not critic,
        torch_dtype=dtype_name,
        # transformers 5 reads the RoPE base from rope_parameters (an inherited one wins over a
        # top-level rope_theta), 4.x from rope_theta: both are written, and agree
        rope_parameters={"rope_type": "default", "rope_theta": model.rotary_base})
    config["dtype"] = dtype_name  # transformers >= 4.56 reads "dtype" first: a base's "float32" must not stay
    config.pop("rope_scaling", None)  # unscaled (a scaled source is refused when it is read)
    config.update(family.hf_fields(model.add_qkv_bias))
    if critic:
        config.update(num_labels=1, id2label={"0": "value"}, label2id={"value": 0}, classifier_dropout=0.0)
    return config


def check_model_matches_hf(model: ModelConfig, hf_dir: str | Path) -> None:
    """Raise ``ConversionError`` naming every field where ``model`` and the HF config disagree."""
    hf = json.loads((Path(hf_dir) / "config.json").read_text())
    expected = model_values_from_hf_config(hf, source=str(Path(hf_dir) / "config.json"))
    diffs = [f"{key}: config {getattr(model, key)!r} vs {Path(hf_dir) / 'config.json'} {value!r}"
             for key, value in expected.items() if getattr(model, key) != value]
    if diffs:
        raise ConversionError("the model config does not match the HF checkpoint:\n  " + "\n  ".join(diffs))


# ----------------------------------------------------------------------------- HF weights


class HFWeights:
    """Lazy access to the tensors of an HF safetensors checkpoint (single file or sharded)."""

    def __init__(self, hf_dir: str | Path) -> None:
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for name, file in weight_map.items():  # bare file names: the index never points outside hf_dir
                if not isinstance(file, str) or Path(file).name != file or file in (".", ".."):
                    raise ConversionError(f"{index}: weight_map sends {name!r} to {file!r}, which is not a file name "
                                          f"in {self.dir} (an edited or hostile index)")
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(self.dir / "model.safetensors", "pt") as handle:
                weight_map = {name: "model.safetensors" for name in handle.keys()}
        else:
            raise ConversionError(f"{self.dir} has no model.safetensors or model.safetensors.index.json "
                                  "(only safetensors checkpoints are read)")
        self.weight_map: dict[str, str] = weight_map
        self._open = safe_open

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        with self._open(self.dir / self.weight_map[name], "pt") as handle:
            return handle.get_tensor(name)


class MegatronFromHF(Mapping[str, torch.Tensor]):
    """A read-only mapping Megatron name -> tensor, computed from HF weights on access.

    Every rank reads only the tensors its shards need. Construction checks that the HF
    checkpoint has exactly the tensors the model needs (extra ones are listed too).
    """

    def __init__(self, weights: HFWeights, model: ModelConfig, *, critic_trunk: bool = False) -> None:
        rows = name_map(model)
        if critic_trunk:  # the critic trunk is the actor minus its output layer
            rows = [row for row in rows if not row.megatron.startswith("output_layer.")]
        self._rows = {row.megatron: row for row in rows}
        self._weights, self._model = weights, model
        needed = {name for row in rows for name in row.hf}
        missing = sorted(needed - weights.names())
        if missing:
            shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
            raise ConversionError(f"{weights.dir} lacks tensors the model needs: {shown}")
        unexpected = sorted(n for n in weights.names() - needed
                            if not n.endswith("rotary_emb.inv_freq") and not (critic_trunk and n == "lm_head.weight"))
        if unexpected:
            raise ConversionError(f"{weights.dir} has tensors this model config does not use (wrong architecture?): "
                                  f"{', '.join(unexpected[:12])}")

    def __getitem__(self, name: str) -> torch.Tensor:
        row = self._rows[canonical_megatron_name(name)]
        return fuse(row, [self._weights.get(n) for n in row.hf], self._model)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def hf_tensors(megatron_tensors: Iterable[tuple[str, torch.Tensor]], model: ModelConfig, *, critic: bool = False
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (HF name, tensor) from (full Megatron name, tensor) pairs (e.g. ``iter_full_tensors``)."""
    rows = {row.megatron: row for row in name_map(model, critic=critic)}
    for name, tensor in megatron_tensors:
        canonical = canonical_megatron_name(name)
        if canonical == "output_layer.weight" and model.tie_word_embeddings and not critic:
            continue  # the last stage's copy of the tied embedding
        if canonical not in rows:
            raise ConversionError(f"Megatron tensor {name!r} has no HF name in the {model.family} map")
        row = rows[canonical]
        yield from zip(row.hf, split(row, tensor, model))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "generation_config.json")


class SafetensorsShardWriter:
    """Writes (name, tensor) pairs into safetensors files of at most ``shard_bytes`` each."""

    def __init__(self, out_dir: Path, prefix: str, shard_bytes: int = 2 << 30,
                 transform: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        self.out_dir, self.prefix, self.shard_bytes, self.transform = out_dir, prefix, shard_bytes, transform
        self.weight_map: dict[str, str] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._count = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = self.transform(tensor).detach().cpu().contiguous()
        if self._pending and self._pending_bytes + tensor.nbytes > self.shard_bytes:
            self.flush()
        self._pending[name] = tensor
        self._pending_bytes += tensor.nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        self._count += 1
        file = f"{self.prefix}-{self._count:05d}.safetensors"
        save_file(self._pending, str(self.out_dir / file), metadata={"format": "pt"})
        self.weight_map.update({name: file for name in self._pending})
        self._pending, self._pending_bytes = {}, 0
