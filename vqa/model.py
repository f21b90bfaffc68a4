"""DeterministicVQA: a DINOv2 image encoder with LoRA, a question encoder, and a fusion decoder in which
the question attends to the image tokens; it predicts an answer class and the question type.

The fusion is question-to-image attention with a sigmoid gate per image token and head instead of a
softmax: a softmax makes the weights sum to one, so "how many" is lost, while independent gates can
select one token (what colour is the triangle), several (how many circles) or none (is there a blue
square). Gated sums of this kind learn in a few hundred steps where a softmax decoder trained from
scratch sat on a plateau for thousands (see the README's accuracy table).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vit
from lora.layer import no_autocast

from .text import QUESTION_TYPES

__all__ = ["DeterministicVQA", "VQAOutput", "GatedQuestionAttention", "answer_loss", "answer_loss_sum",
           "answer_loss_total"]


class VQAOutput(NamedTuple):
    # A NamedTuple, not a dataclass: DistributedDataParallel finds output tensors only in types torch's
    # pytree knows, and with a dataclass it silently skips the gradient all-reduce (pytorch#124666).
    logits: Tensor  # (B_q, num_answers)
    type_logits: Tensor  # (B_q, num_question_types)


class GatedQuestionAttention(nn.Module):
    """The question attends to image tokens: ``g = sigmoid(q . k_i / sqrt(d) + b)`` per token and head, and
    the output is ``sum_i g_i v_i`` with the gate totals (a soft count per head) appended."""

    def __init__(self, token_dim: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.dim = num_heads, dim
        self.query = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_heads * dim))
        self.key = nn.Linear(token_dim, num_heads * dim)
        self.value = nn.Linear(token_dim, num_heads * dim)
        # A fixed offset keeps gates mostly closed (sigmoid(-2) = 0.12) unless a token matches: sums start
        # near zero instead of averaging every token at 0.5. In our runs this was the difference between
        # a plateau and fast learning; a learned offset drifted open and lost the counts.
        self.gate_bias = -2.0
        self.out_dim = num_heads * dim + num_heads

    def forward(self, question: Tensor, tokens: Tensor) -> Tensor:
        B, N, _ = tokens.shape  # tokens: (B_q, N, token_dim), question: (B_q, dim)
        H, d = self.num_heads, self.dim
        q = self.query(question).view(B, 1, H, d)
        k = self.key(tokens).view(B, N, H, d)
        v = self.value(tokens).view(B, N, H, d)
        gate = torch.sigmoid((q * k).sum(-1) / d**0.5 + self.gate_bias)  # (B_q, N, H)
        pooled = (gate.unsqueeze(-1) * v).sum(1).reshape(B, H * d)  # (B_q, H * d)
        return torch.cat([pooled, gate.sum(1)], dim=-1)  # (B_q, H * d + H)


class DeterministicVQA(nn.Module):
    """Image encoder (timm ViT, LoRA on every qkv, or the blocks' ``vision_lora_targets``) + question encoder + gated
    question-to-image attention."""

    def __init__(
        self,
        *,
        vision_model: str = "vit_base_patch14_dinov2",
        img_size: int = 224,
        pretrained: bool = False,
        checkpoint_path: str | os.PathLike | None = None,
        use_vision_lora: bool = True,
        vision_lora_r: int = 8,
        vision_lora_alpha: float = 16.0,
        vision_lora_dropout: float = 0.1,
        vision_lora_targets: tuple[str, ...] = ("qkv",),
        vocab_size: int = 1000,
        num_answers: int = 1000,
        max_question_length: int = 32,
        hidden_dim: int = 256,
        num_heads: int = 4,
        question_layers: int = 1,
        dropout: float = 0.1,
        num_question_types: int = len(QUESTION_TYPES),
        backbone_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.backbone = vit.create_backbone(
            vision_model, pretrained=pretrained, checkpoint_path=checkpoint_path, img_size=img_size,
            **(backbone_kwargs or {}),
        )
        width = self.backbone.embed_dim
        prefix = self.backbone.num_prefix_tokens
        grid_h, grid_w = self.backbone.patch_embed.grid_size
        d = hidden_dim

        # Per-channel standardisation over all tokens of the batch: backbone features share a large
        # offset (most patches are alike), which hides the differences the decoder has to find.
        self.image_norm = nn.BatchNorm1d(width)
        self.image_mlp = nn.Sequential(nn.Linear(width, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.image_pos = nn.Parameter(torch.randn(1, prefix + grid_h * grid_w, d))  # learned, one per token
        # Fixed one-hot row and column of each patch (zero for prefix tokens): "top left" becomes linear.
        coords = torch.zeros(prefix + grid_h * grid_w, grid_h + grid_w)
        for i in range(grid_h * grid_w):
            coords[prefix + i, i // grid_w] = 1.0
            coords[prefix + i, grid_h + i % grid_w] = 1.0
        self.register_buffer("coords", coords.unsqueeze(0), persistent=False)

        self.word_embed = nn.Embedding(vocab_size, d, padding_idx=0)
        self.word_pos = nn.Parameter(torch.zeros(1, max_question_length, d))
        self.question_encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, num_heads, 4 * d, dropout, activation="gelu", batch_first=True, norm_first=True),
            question_layers,
            enable_nested_tensor=False,
        ) if question_layers else nn.Identity()
        self.question_norm = nn.LayerNorm(d)
        self.fusion = GatedQuestionAttention(2 * d + grid_h + grid_w, d, num_heads)
        fused = self.fusion.out_dim + d
        self.answer_head = nn.Sequential(nn.Linear(fused, 2 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * d, num_answers))
        self.type_head = nn.Linear(d, num_question_types)
        nn.init.trunc_normal_(self.word_pos, std=0.02)
        # Adapters last, so the decoder starts from the same random draw with or without LoRA: variants
        # compared with one seed differ only in what they train.
        if use_vision_lora:
            vit.add_lora(self.backbone, r=vision_lora_r, alpha=vision_lora_alpha, dropout=vision_lora_dropout,
                         targets=vision_lora_targets)

    def decoder_modules(self) -> list[nn.Module]:
        """Everything outside the backbone."""
        return [m for name, m in self.named_children() if name != "backbone"]

    def freeze_pretrained(self, unfreeze_encoder_layers: int = 0, unfreeze_decoder: bool = True) -> None:
        """Freezes the backbone except its LoRA adapters and its last ``unfreeze_encoder_layers`` blocks (with them, its
        final norm)."""
        vit.freeze_backbone(self.backbone, unfreeze_last=unfreeze_encoder_layers)
        for module in self.decoder_modules():
            module.requires_grad_(unfreeze_decoder)
        self.image_pos.requires_grad_(unfreeze_decoder)
        self.word_pos.requires_grad_(unfreeze_decoder)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        tokens = self.backbone.forward_features(pixel_values)  # (B_img, N, C), prefix tokens first
        B, N, C = tokens.shape
        tokens = self.image_mlp(self.image_norm(tokens.reshape(B * N, C)).view(B, N, C))  # (B_img, N, d)
        return torch.cat([tokens, self.image_pos.expand(B, -1, -1), self.coords.expand(B, -1, -1)], dim=-1)

    def encode_question(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        keep = (input_ids != 0) if attention_mask is None else attention_mask != 0  # (B_q, L)
        L = input_ids.shape[1]
        x = self.word_embed(input_ids) + self.word_pos[:, :L]  # (B_q, L, d)
        if isinstance(self.question_encoder, nn.TransformerEncoder):
            x = self.question_encoder(x, src_key_padding_mask=~keep)
        keep = keep.unsqueeze(-1)
        # masked_fill, not a product: torch's fast eval path gives a question with no token left nan rows
        x = x.masked_fill(~keep, 0.0)
        return self.question_norm(x.sum(1) / keep.sum(1).clamp(min=1).to(x.dtype))  # masked mean: (B_q, d)

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        image_index: Tensor | None = None,
    ) -> VQAOutput:
        """``image_index[q]`` names the image of question ``q`` (default: one image per question), so
        several questions about one image share a single pass of the image encoder."""
        image = self.encode_image(pixel_values)  # (B_img, N, 2d + grid_h + grid_w)
        if image_index is not None:
            image = image[image_index]  # (B_q, N, ...)
        question = self.encode_question(input_ids, attention_mask)  # (B_q, d)
        fused = torch.cat([self.fusion(question, image), question], dim=-1)
        # The heads in their own dtype (fp32 for a model trained under autocast), autocast off: a bf16 logit keeps
        # 8 bits, so answers a few hundredths apart would tie and argmax would take the first of them. The heads
        # are a sliver of the model's work.
        dtype = self.type_head.weight.dtype
        with no_autocast(fused.device):
            return VQAOutput(self.answer_head(fused.to(dtype)), self.type_head(question.to(dtype)))

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What training changes: trainable parameters (LoRA, unfrozen blocks, decoder) and decoder buffers."""
        params = dict(self.named_parameters())
        return {
            k: v for k, v in self.state_dict().items()
            if (params[k].requires_grad if k in params else not k.startswith("backbone."))
        }


def answer_loss(logits: Tensor, batch: dict[str, Tensor], weight: Tensor | None = None) -> Tensor:
    """Cross-entropy of the answer logits (in fp32) against the batch's answers, ``weight`` per answer class.

    A question with several answers (``answer_ids`` and ``answer_counts`` in the batch, as ``collate`` gives them)
    targets each by its share of them: the loss is ``sum_q sum_a w_a p_qa (-log softmax_qa) / sum_q sum_a w_a p_qa``
    over known answers, which for questions with one answer each is what ``F.cross_entropy`` computes. The divisor
    is ``answer_loss_total(batch, weight)``."""
    if "answer_ids" not in batch:
        return F.cross_entropy(logits.float(), batch["answer"], weight=weight, ignore_index=-1)
    return answer_loss_sum(logits, batch, weight) / _answer_shares(batch, weight)[1].sum()


def answer_loss_sum(logits: Tensor, batch: dict[str, Tensor], weight: Tensor | None = None) -> Tensor:
    """``answer_loss`` times its divisor, ``answer_loss_total``: summed over several batches, and divided by their
    totals' sum, it gives the loss of one batch of all of them (0 for a batch with no known answer)."""
    logits = logits.float()
    if "answer_ids" not in batch:
        return F.cross_entropy(logits, batch["answer"], weight=weight, ignore_index=-1, reduction="sum")
    ids, share = _answer_shares(batch, weight)
    return -(share * logits.log_softmax(-1).gather(1, ids)).sum()


def answer_loss_total(batch: dict[str, Tensor], weight: Tensor | None = None) -> Tensor:
    """What ``answer_loss`` divides its sum by: the weight of the batch's known answers (a question's several
    answers share its one). It needs no logits: a step that sums the gradients of several batches scales each
    batch's loss by its total over all of theirs before any of them runs."""
    if "answer_ids" not in batch:
        known = batch["answer"][batch["answer"] >= 0]
        return torch.tensor(float(known.numel())) if weight is None else weight[known].sum()
    return _answer_shares(batch, weight)[1].sum()


def _answer_shares(batch: dict[str, Tensor], weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """The answers of each question, ``(B_q, K)`` class ids (0 where none), and each one's weight: its share of
    the question's answers times its class's weight, 0 for an answer outside the vocabulary."""
    ids, counts = batch["answer_ids"], batch["answer_counts"]
    known = ids >= 0
    ids = ids.clamp(min=0)
    share = counts * known / counts.sum(1, keepdim=True)
    if weight is not None:
        share = share * weight[ids]
    return ids, share
