"""Prompt data: sources, templates, the synthetic arithmetic task and the tiny CPU model."""

from remix_megatron.data.prompts import PAPER_TEMPLATE, Prompt, PromptSource, load_records, load_tokenizer, render

__all__ = ["PAPER_TEMPLATE", "Prompt", "PromptSource", "load_records", "load_tokenizer", "render"]
