"""Evaluation: pass@1 and avg@k on the paper's math benchmarks, with any generation engine.

The runner (engine calls, grading, outputs) is ``remix_megatron.evaluation.runner``; this
package's top level stays free of torch so that the CLI imports cheaply.
"""

from remix_megatron.evaluation.benchmarks import (
    PAPER_BENCHMARKS,
    Benchmark,
    Protocol,
    config_benchmarks,
    resolve_benchmarks,
)
from remix_megatron.evaluation.metrics import (
    REFLECTION_WORDS,
    avg_at_k,
    format_correct,
    pass_at_k,
    prompt_opens_think,
    self_reflection,
)

__all__ = ["PAPER_BENCHMARKS", "Benchmark", "Protocol", "config_benchmarks", "resolve_benchmarks", "REFLECTION_WORDS",
           "avg_at_k", "format_correct", "pass_at_k", "prompt_opens_think", "self_reflection"]
