"""Megatron actor and critic models, vocab-parallel log-probs, optimizers and TP/PP sharding."""

from remix_megatron.models.build import ValueHead, build_actor, build_critic, layer_spec, transformer_config
from remix_megatron.models.logprobs import vocab_parallel_logprobs_entropy
from remix_megatron.models.optimizer import TrainableModel, make_trainable
from remix_megatron.models.sharding import iter_full_tensors, load_full_state_dict, param_grad

__all__ = [
    "ValueHead", "build_actor", "build_critic", "layer_spec", "transformer_config",
    "vocab_parallel_logprobs_entropy", "TrainableModel", "make_trainable",
    "iter_full_tensors", "load_full_state_dict", "param_grad",
]
