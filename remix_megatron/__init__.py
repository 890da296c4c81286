"""remix-megatron: off-policy ReMix reinforcement fine-tuning of LLMs on Megatron-core.

Importing the package is cheap: megatron-core, vLLM, SGLang and TransformerEngine are
imported only by the modules that use them.
"""

__version__ = "0.1.0"
