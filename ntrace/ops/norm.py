"""Per-sample normalisations with nothing to record (Jacobians through them by autograd, in
either mode, since each sample is normalised by its own statistics): GroupNorm, RMSNorm,
InstanceNorm, LocalResponseNorm. Their functional forms need no entry: nothing is recorded."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ntrace.ops.base import PassthroughOp


class Norm(PassthroughOp):
    label: ClassVar[str] = "GroupNorm, RMSNorm, InstanceNorm, LocalResponseNorm"
    modules = (nn.GroupNorm, nn.RMSNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
               nn.LocalResponseNorm)
    # Hugging Face transformers' RMSNorms, by qualified class name (never imported)
    module_names = tuple(f"transformers.models.{m}" for m in (
        "llama.modeling_llama.LlamaRMSNorm", "mistral.modeling_mistral.MistralRMSNorm",
        "qwen2.modeling_qwen2.Qwen2RMSNorm", "qwen3.modeling_qwen3.Qwen3RMSNorm",
        "gemma.modeling_gemma.GemmaRMSNorm", "t5.modeling_t5.T5LayerNorm"))
