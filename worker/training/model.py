"""Base model + LoRA, and the loss module that DDP wraps.

The loss never materialises full-vocabulary logits for the whole batch: the backbone's hidden
states are gathered at the positions that carry a target (answer tokens only), then projected by
the LM head and scored in chunks under activation checkpointing, so at most one chunk of logits
lives at a time, in the forward and in the backward. At small model sizes these logits, not the
weights, dominate a step's memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from shared.spec import LoraSettings

LOSS_CHUNK_TOKENS = 1024


def load_tokenizer(path: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        # Padding never reaches the loss (targets are ignored there); any id in range will do.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_base_model(path: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    return cast(PreTrainedModel, model)


def apply_lora(model: PreTrainedModel, lora: LoraSettings) -> PeftModel:
    """Wrap with peft; everything but the adapters is frozen by peft itself."""
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return cast(PeftModel, get_peft_model(model, config))


def _backbone(causal_lm: nn.Module) -> nn.Module:
    """The decoder under the LM head (``model`` for Llama/Qwen2, ``transformer`` for GPT-2)."""
    prefix = getattr(causal_lm, "base_model_prefix", "model")
    backbone = getattr(causal_lm, prefix, None)
    if backbone is None:
        raise ValueError(f"cannot find the decoder of {type(causal_lm).__name__}")
    return cast(nn.Module, backbone)


def _logit_transform(config: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reproduce the head post-processing some families apply (Cohere scale, Gemma soft-cap)."""
    scale = getattr(config, "logit_scale", None)
    cap = getattr(config, "final_logit_softcapping", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


class CausalLMLoss(nn.Module):
    """Returns the *sum* of token losses and the count of target tokens.

    Summing (not averaging) lets the caller normalise by the global token count of the whole
    optimizer step, which makes 1 process x 4 rows and 2 processes x 2 rows the same update.
    """

    def __init__(self, peft_model: PeftModel, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> None:
        super().__init__()
        self.peft_model = peft_model
        causal_lm = peft_model.get_base_model()
        self._backbone = _backbone(causal_lm)
        head = causal_lm.get_output_embeddings()  # type: ignore[operator]
        if head is None:
            raise ValueError("model has no output embeddings (LM head)")
        self._head = head
        self._transform = _logit_transform(causal_lm.config)
        self.chunk_tokens = chunk_tokens

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self._transform(self._head(hidden)).float()
        return F.cross_entropy(logits, targets, reduction="sum")

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._backbone(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
        )
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        keep = targets != -100
        count = keep.sum()
        selected = hidden[keep]
        wanted = targets[keep]
        if selected.shape[0] == 0:
            # Keep every parameter in the graph so DDP's reducer still fires (zero gradient).
            return hidden.sum() * 0.0, count
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, selected.shape[0], self.chunk_tokens):
            h = selected[start : start + self.chunk_tokens]
            y = wanted[start : start + self.chunk_tokens]
            if torch.is_grad_enabled():
                total = total + checkpoint(self._chunk_loss, h, y, use_reentrant=False)
            else:
                total = total + self._chunk_loss(h, y)
        return total, count


def token_losses(peft_or_causal: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Per-position next-token losses through the model's own forward (reference for tests)."""
    with torch.no_grad():
        logits = peft_or_causal(input_ids=input_ids, use_cache=False, **kwargs).logits.float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        input_ids[:, 1:].reshape(-1),
        reduction="none",
    ).view(input_ids.shape[0], -1)
