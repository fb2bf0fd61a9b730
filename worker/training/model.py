"""Base model + LoRA, and the loss module that DDP wraps.

The loss never materialises full-vocabulary logits for the whole batch: the backbone's hidden
states are gathered at the positions that carry a target (answer tokens only), then projected by
the LM head and scored in chunks, so at most one chunk of logits lives at a time. At small model
sizes these logits, not the weights, dominate a step's memory.

With a frozen head (every LoRA job unless the head itself is a target) the loss is *fused*: each
chunk's gradient with respect to its hidden states is computed right in the forward and kept
(tokens x hidden, tiny), and the backward only scales it. That saves the recomputation activation
checkpointing would do (one head matmul and one log-softmax per chunk). A trainable head keeps the
checkpointed path, so its parameters get their gradients from autograd as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from shared.modelinfo import default_target_modules
from shared.spec import LoraSettings
from worker.training.attention import (
    IMPLEMENTATION,
    LAYOUT_KWARG,
    SegmentLayout,
    build_layout,
    segments_only,
)
from worker.training.data import IGNORE_INDEX

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


def with_default_targets(model: nn.Module, lora: LoraSettings) -> LoraSettings:
    """``lora`` with ``target_modules`` filled in from the model when the job gave none (the
    same rule the API applies to the model's safetensors, shared.modelinfo)."""
    if lora.target_modules is not None:
        return lora
    suffixes = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D)
    }
    return lora.model_copy(update={"target_modules": default_target_modules(suffixes)})


def disable_dropout(model: nn.Module) -> int:
    """Zero every dropout of ``model``: its ``nn.Dropout`` modules and the attention dropout rate
    attention modules keep as a number. Returns how many were non-zero.

    DPO compares the policy's log-probabilities with the reference's, both from this model: with
    the base's own dropout on (GPT-2 ships 0.1), both are noisy, the reference is not the policy
    at step 1 (the loss does not start at log 2) and the precomputed reference differs from a
    per-step one. TRL's ``DPOTrainer`` does the same by default (``disable_dropout``). Called on
    the base before peft wraps it, so the adapter's own ``lora.dropout`` stays as the job set it.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            changed += 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            setattr(module, "attention_dropout", 0.0)  # noqa: B010 (nn.Module typing)
            changed += 1
    return changed


def apply_lora(model: PreTrainedModel, lora: LoraSettings) -> PeftModel:
    """Wrap with peft; everything but the adapters is frozen by peft itself.

    ``lora.target_modules`` must be resolved (``with_default_targets``, once, by the caller that
    also records what was chosen).
    """
    if lora.target_modules is None:
        raise ValueError("target_modules is unresolved: apply with_default_targets first")
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


class _FusedHeadLoss(torch.autograd.Function):
    """Per-token cross-entropy of hidden states through a frozen head, gradient computed eagerly.

    Token ``t``'s loss depends on hidden row ``t`` alone, so the gradient of the chunk's *sum*
    with respect to the chunk's hidden states holds, row by row, each token's own gradient: kept
    (tokens x hidden), it serves any weighting of the tokens the caller applies later (a plain
    sum for supervised training, per-sequence sums through the DPO sigmoid), one scale per row.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        chunk_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        chunk_tokens: int,
    ) -> torch.Tensor:
        losses = []
        grads = []
        for start in range(0, hidden.shape[0], chunk_tokens):
            with torch.enable_grad():
                h = hidden[start : start + chunk_tokens].detach().requires_grad_()
                loss = chunk_loss(h, targets[start : start + chunk_tokens])
                (grad,) = torch.autograd.grad(loss.sum(), h)
            losses.append(loss.detach())
            grads.append(grad)
        ctx.save_for_backward(torch.cat(grads) if len(grads) > 1 else grads[0])
        return torch.cat(losses) if len(losses) > 1 else losses[0]

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype).unsqueeze(1), None, None, None


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
        self._config = causal_lm.config
        self._transform = _logit_transform(causal_lm.config)
        self.chunk_tokens = chunk_tokens
        implementation = getattr(causal_lm.config, "_attn_implementation", None)
        self.packed_attention = implementation == IMPLEMENTATION

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each token's cross-entropy (fp32 logits of one chunk only)."""
        logits = self._transform(self._head(hidden)).float()
        return F.cross_entropy(logits, targets, reduction="none")

    @torch.no_grad()
    def segment_attention_error(self) -> str | None:
        """Run three packed documents through segment attention and through transformers' own
        masked SDPA; None when the hidden states agree, else what went wrong.

        A guard for architectures nobody tested here: if a model passes the layout somewhere it
        should not, or attends in a way SDPA does not express, the job falls back to the mask.
        """
        if not self.packed_attention:
            return "segment attention is not enabled for this model"
        device = next(self.parameters()).device
        lengths = (5, 3, 4)
        positions = torch.tensor([[p for n in lengths for p in range(n)]], device=device)
        vocab = int(getattr(self._head, "out_features", 0) or 64)
        input_ids = (torch.arange(positions.shape[1], device=device) * 7 + 3) % vocab
        input_ids = input_ids.unsqueeze(0)
        was_training = self.training
        self.eval()
        try:
            reference = self._hidden(input_ids, positions, {})
            layout = build_layout(positions, device)
            with segments_only(self._config):
                ours = self._hidden(input_ids, positions, {LAYOUT_KWARG: layout})
        except Exception as exc:  # any failure means: do not use it
            return f"{type(exc).__name__}: {exc}"
        finally:
            self.train(was_training)
        scale = float(reference.float().abs().max()) + 1e-6
        error = float((ours.float() - reference.float()).abs().max()) / scale
        tolerance = 1e-4 if reference.dtype == torch.float32 else 2e-2
        return None if error <= tolerance else f"hidden states differ by {error:.2e} (relative)"

    def _hidden(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        extra: dict[str, Any],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self._backbone(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **extra,
        )
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def token_losses(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        layout: SegmentLayout | None = None,
        target_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy of every target token, in ``target_index`` order; the hidden states).

        ``target_index``: flat indices (into ``[rows * width]``) of the positions whose target
        is not ``IGNORE_INDEX``, computed on the host by the collator. With it the step needs no
        boolean indexing (a host-device sync per call on a GPU); without it they are found here.
        """
        extra: dict[str, Any] = {}
        context: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if layout is not None and self.packed_attention:
            extra[LAYOUT_KWARG] = layout
            context = segments_only(self._config)
        with context:
            hidden = self._hidden(input_ids, position_ids, extra, attention_mask)
        flat_targets = targets.reshape(-1)
        if target_index is None:
            target_index = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
        if target_index.numel() == 0:
            return hidden.new_zeros(0, dtype=torch.float32), hidden
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)
        wanted = flat_targets.index_select(0, target_index)
        if torch.is_grad_enabled() and not any(p.requires_grad for p in self._head.parameters()):
            fused = _FusedHeadLoss.apply(selected, wanted, self._chunk_loss, self.chunk_tokens)
            return cast(torch.Tensor, fused), hidden
        losses = []
        for start in range(0, selected.shape[0], self.chunk_tokens):
            h = selected[start : start + self.chunk_tokens]
            y = wanted[start : start + self.chunk_tokens]
            if torch.is_grad_enabled():
                losses.append(checkpoint(self._chunk_loss, h, y, use_reentrant=False))
            else:
                losses.append(self._chunk_loss(h, y))
        return (torch.cat(losses) if len(losses) > 1 else losses[0]), hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        layout: SegmentLayout | None = None,
        target_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss of the target tokens, their count); see ``token_losses``."""
        losses, hidden = self.token_losses(
            input_ids, targets, position_ids, attention_mask, layout, target_index
        )
        count = torch.tensor(losses.numel())  # on the host: no device round trip
        if losses.numel() == 0:
            # Keep every parameter in the graph so DDP's reducer still fires (zero gradient).
            return hidden.sum() * 0.0, count
        return losses.sum(), count


# The sums a DPO loss module returns besides the loss, in this order (all ranks add them up).
DPO_STATS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "pairs")


class DpoLoss(CausalLMLoss):
    """The sigmoid DPO loss of a batch of preference pairs, summed over pairs.

    Per pair, with ``pi`` the summed log-probability of an answer's tokens under the policy (base +
    adapter) and ``ref`` under the reference (the same base with the adapter disabled, peft's
    ``disable_adapter()``, in the same step, without autograd; or precomputed once and passed
    in as ``reference_logps``; a job starting from ``training.init_adapter`` precomputes it
    with the adapter on, before the first update: the starting adapter is its reference):

        loss = -log sigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)))

    Rewards are ``beta * (pi - ref)`` of each answer; accuracy counts pairs whose chosen reward
    is the higher. Returns (summed loss, device tensor of the ``DPO_STATS`` sums): the caller
    divides by the global pair count of the step, like the supervised loss by its token count.
    Token log-probabilities come from the fused head (no full-vocabulary logits), and each
    sequence's sum is an ``index_add`` over its targets, so packed rows of many pairs cost one
    forward.
    """

    def __init__(
        self, peft_model: PeftModel, beta: float, chunk_tokens: int = LOSS_CHUNK_TOKENS
    ) -> None:
        super().__init__(peft_model, chunk_tokens)
        self.beta = beta

    def sequence_logps(
        self, target_sequence: torch.Tensor, pairs: int, **inputs: Any
    ) -> torch.Tensor:
        """Summed log-probability of each of the batch's ``2 * pairs`` sequences."""
        losses, hidden = self.token_losses(**inputs)
        sums = hidden.new_zeros(2 * pairs, dtype=torch.float32)
        if losses.numel() == 0:
            return sums + hidden.sum() * 0.0  # every parameter stays in the graph (DDP)
        return sums.index_add(0, target_sequence, -losses)

    @torch.no_grad()
    def reference_sequence_logps(
        self,
        target_sequence: torch.Tensor,
        pair_ids: torch.Tensor,
        with_adapter: bool = False,
        **inputs: Any,
    ) -> torch.Tensor:
        """The reference's sequence log-probabilities: the base model, adapter disabled; with
        ``with_adapter``, the model as it is now (only meaningful before the first update, when
        the starting adapter of ``training.init_adapter`` is the reference)."""
        context = contextlib.nullcontext() if with_adapter else self.peft_model.disable_adapter()
        with context:
            return self.sequence_logps(target_sequence, pair_ids.numel(), **inputs)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        target_sequence: torch.Tensor,
        pair_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        layout: SegmentLayout | None = None,
        target_index: torch.Tensor | None = None,
        reference_logps: torch.Tensor | None = None,
        reference_only: bool = False,
        reference_with_adapter: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, ``DPO_STATS`` sums); ``reference_only``: (the reference's sequence
        log-probabilities, nothing), for precomputing them through the module's own forward
        (under FSDP the forward is what gathers the root's parameters), with the adapter off or
        (``reference_with_adapter``) on."""
        inputs: dict[str, Any] = {
            "input_ids": input_ids,
            "targets": targets,
            "position_ids": position_ids,
            "attention_mask": attention_mask,
            "layout": layout,
            "target_index": target_index,
        }
        pairs = pair_ids.numel()
        if reference_only:
            reference = self.reference_sequence_logps(
                target_sequence, pair_ids, reference_with_adapter, **inputs
            )
            return reference, reference.new_zeros(0)
        if reference_logps is None:
            # First, so its activations are gone before the policy's graph is built.
            reference_logps = self.reference_sequence_logps(target_sequence, pair_ids, **inputs)
        policy = self.sequence_logps(target_sequence, pairs, **inputs)
        ratios = (policy - reference_logps.to(policy.dtype)).view(pairs, 2)
        logits = self.beta * (ratios[:, 0] - ratios[:, 1])
        loss = -F.logsigmoid(logits).sum()
        if pairs == 0:
            loss = loss + policy.sum() * 0.0  # no pair here: still in the graph (DDP)
        with torch.no_grad():
            rewards = self.beta * ratios.detach()
            stats = torch.stack(
                [
                    rewards[:, 0].sum(),
                    rewards[:, 1].sum(),
                    (rewards[:, 0] > rewards[:, 1]).float().sum(),
                    (rewards[:, 0] - rewards[:, 1]).sum(),
                    rewards.new_tensor(float(pairs)),
                ]
            )
        return loss, stats
