"""The two-stream ViLBERT of the 12-in-1 release, module for module.

Module and parameter names reproduce the released checkpoint's state-dict keys exactly (including the
reference's spellings `linguisic_logit`, `biOutput`, `LayerNorm1/2`, `logit_fc.{0,2,3}`), so
`multi_task_model.bin` loads with `strict=True`.

Shapes in docstrings: B batch, L text length (after the task token is inserted), R regions,
H text width (768), V visual width (1024), C co-attention width (1024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import GQA_NUM_ANSWERS, NUM_TASK_EMBEDDINGS, VQA_NUM_ANSWERS, ViLBertConfig

LAYER_NORM_EPS = 1e-12
# The reference masks with a large finite negative, not -inf; kept for identical probabilities.
MASK_VALUE = -10000.0


def activation(name: str) -> nn.Module:
    # nn.GELU() is the exact erf form the reference uses.
    return nn.GELU() if name == "gelu" else nn.ReLU()


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] 1 = keep, 0 = pad  ->  [B, 1, 1, N] additive mask (0 or -10000) for attention scores."""
    return ((1.0 - mask.to(dtype)) * MASK_VALUE)[:, None, None, :]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, D] -> [B, heads, N, D/heads]"""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> [B, N, heads*d]"""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, num_heads: int, dropout: float
) -> torch.Tensor:
    """Multi-head scaled dot-product attention. query [B, Nq, C], key/value [B, Nk, C], mask [B, 1, 1, Nk]
    additive. Returns [B, Nq, C]."""
    context = F.scaled_dot_product_attention(
        split_heads(query, num_heads),
        split_heads(key, num_heads),
        split_heads(value, num_heads),
        attn_mask=mask.to(query.dtype),
        dropout_p=dropout,
    )
    return merge_heads(context)


# --------------------------------------------------------------------------------------------------------------
# Embeddings


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, with the task token inserted after [CLS]."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        if config.task_specific_tokens:
            self.task_embeddings = nn.Embedding(NUM_TASK_EMBEDDINGS, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, task_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids, token_type_ids [B, L0] -> [B, L0 + 1, H] with task tokens, else [B, L0, H].

        The task vector gets no position or type embedding and the text keeps positions 0..L0-1."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings(token_type_ids)
        )
        if hasattr(self, "task_embeddings"):
            if task_ids is None:
                raise ValueError("this model has task-specific tokens: task_ids [B, 1] is required")
            task = self.task_embeddings(task_ids.reshape(-1, 1))
            embeddings = torch.cat([embeddings[:, :1], task, embeddings[:, 1:]], dim=1)
        return self.dropout(self.LayerNorm(embeddings))


class BertImageEmbeddings(nn.Module):
    """Region features and 5-d box locations projected to the visual width."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.image_embeddings = nn.Linear(config.v_feature_size, config.v_hidden_size)
        self.image_location_embeddings = nn.Linear(5, config.v_hidden_size)
        self.LayerNorm = nn.LayerNorm(config.v_hidden_size, eps=LAYER_NORM_EPS)
        # The reference uses the text dropout rate here.
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, features: torch.Tensor, spatials: torch.Tensor) -> torch.Tensor:
        """features [B, R, 2048], spatials [B, R, 5] -> [B, R, V]"""
        embeddings = self.image_embeddings(features) + self.image_location_embeddings(spatials)
        return self.dropout(self.LayerNorm(embeddings))


# --------------------------------------------------------------------------------------------------------------
# Single-stream transformer layers (text and visual share the structure, not the widths)


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout_p = dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, N, D], mask [B, 1, 1, N] additive -> context [B, N, D]"""
        dropout = self.dropout_p if self.training else 0.0
        return attend(self.query(hidden), self.key(hidden), self.value(hidden), mask, self.num_heads, dropout)


class ResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual); the names match both `attention.output` and `output`."""

    def __init__(self, in_width: int, out_width: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_width, out_width)
        self.LayerNorm = nn.LayerNorm(out_width, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int, attention_dropout: float, hidden_dropout: float):
        super().__init__()
        self.self = SelfAttention(width, num_heads, attention_dropout)
        self.output = ResidualOutput(width, width, hidden_dropout)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, mask), hidden)


class Intermediate(nn.Module):
    def __init__(self, width: int, inner: int, act: str):
        super().__init__()
        self.dense = nn.Linear(width, inner)
        self.act = activation(act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class TransformerLayer(nn.Module):
    """Post-LN BERT block. Used as `bert.encoder.layer.i` (text) and `bert.encoder.v_layer.i` (visual)."""

    def __init__(self, width: int, num_heads: int, inner: int, act: str, attention_dropout: float, hidden_dropout: float):
        super().__init__()
        self.attention = Attention(width, num_heads, attention_dropout, hidden_dropout)
        self.intermediate = Intermediate(width, inner, act)
        self.output = ResidualOutput(inner, width, hidden_dropout)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, N, D], mask [B, 1, 1, N] -> [B, N, D]"""
        attended = self.attention(hidden, mask)
        return self.output(self.intermediate(attended), attended)


# --------------------------------------------------------------------------------------------------------------
# Co-attention ("connection") layer. Index 1 = visual side, 2 = text side, as in the checkpoint.


class BiAttention(nn.Module):
    """Each stream's queries attend to the other stream's keys and values."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        width = config.bi_hidden_size
        self.num_heads = config.bi_num_attention_heads
        self.query1 = nn.Linear(config.v_hidden_size, width)
        self.key1 = nn.Linear(config.v_hidden_size, width)
        self.value1 = nn.Linear(config.v_hidden_size, width)
        self.query2 = nn.Linear(config.hidden_size, width)
        self.key2 = nn.Linear(config.hidden_size, width)
        self.value2 = nn.Linear(config.hidden_size, width)
        # Text queries over image keys use the visual attention dropout, image queries over text the text one.
        self.text_query_dropout = config.v_attention_probs_dropout_prob
        self.image_query_dropout = config.attention_probs_dropout_prob

    def forward(
        self, visual: torch.Tensor, visual_mask: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """visual [B, R, V], text [B, L, H], masks additive [B, 1, 1, R] / [B, 1, 1, L].
        Returns (visual_context [B, R, C] from words, text_context [B, L, C] from regions)."""
        training = self.training
        visual_context = attend(
            self.query1(visual), self.key2(text), self.value2(text), text_mask, self.num_heads,
            self.image_query_dropout if training else 0.0,
        )
        text_context = attend(
            self.query2(text), self.key1(visual), self.value1(visual), visual_mask, self.num_heads,
            self.text_query_dropout if training else 0.0,
        )
        return visual_context, text_context


class BiOutput(nn.Module):
    """Projects each cross-attention context back to its stream's width, with residual and LayerNorm.

    `q_dense1` / `q_dense2` exist in the released checkpoint but the reference forward never applies them; they
    are kept only so that the checkpoint loads strictly."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.dense1 = nn.Linear(config.bi_hidden_size, config.v_hidden_size)
        self.LayerNorm1 = nn.LayerNorm(config.v_hidden_size, eps=LAYER_NORM_EPS)
        self.dropout1 = nn.Dropout(config.v_hidden_dropout_prob)
        self.q_dense1 = nn.Linear(config.bi_hidden_size, config.v_hidden_size)
        self.dense2 = nn.Linear(config.bi_hidden_size, config.hidden_size)
        self.LayerNorm2 = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout2 = nn.Dropout(config.hidden_dropout_prob)
        self.q_dense2 = nn.Linear(config.bi_hidden_size, config.hidden_size)

    def forward(
        self, visual_context: torch.Tensor, visual: torch.Tensor, text_context: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.LayerNorm1(self.dropout1(self.dense1(visual_context)) + visual)
        text = self.LayerNorm2(self.dropout2(self.dense2(text_context)) + text)
        return visual, text


class ConnectionLayer(nn.Module):
    """`bert.encoder.c_layer.k`: co-attention, then a separate feed-forward block per stream."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.biattention = BiAttention(config)
        self.biOutput = BiOutput(config)
        self.v_intermediate = Intermediate(config.v_hidden_size, config.v_intermediate_size, config.v_hidden_act)
        self.v_output = ResidualOutput(config.v_intermediate_size, config.v_hidden_size, config.v_hidden_dropout_prob)
        self.t_intermediate = Intermediate(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.t_output = ResidualOutput(config.intermediate_size, config.hidden_size, config.hidden_dropout_prob)

    def forward(
        self, visual: torch.Tensor, visual_mask: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """visual [B, R, V], text [B, L, H] -> same shapes."""
        visual_context, text_context = self.biattention(visual, visual_mask, text, text_mask)
        visual, text = self.biOutput(visual_context, visual, text_context, text)
        visual = self.v_output(self.v_intermediate(visual), visual)
        text = self.t_output(self.t_intermediate(text), text)
        return visual, text


class BertEncoder(nn.Module):
    """Text layers, visual layers and co-attention layers, run in the reference's interleaved schedule.

    Before co-attention block k, the text stream has run `t_biattention_id[k]` layers and the visual stream
    `v_biattention_id[k]` layers; the remaining layers of each stream run after the last block."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(
            TransformerLayer(
                config.hidden_size, config.num_attention_heads, config.intermediate_size, config.hidden_act,
                config.attention_probs_dropout_prob, config.hidden_dropout_prob,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.v_layer = nn.ModuleList(
            TransformerLayer(
                config.v_hidden_size, config.v_num_attention_heads, config.v_intermediate_size, config.v_hidden_act,
                config.v_attention_probs_dropout_prob, config.v_hidden_dropout_prob,
            )
            for _ in range(config.v_num_hidden_layers)
        )
        self.c_layer = nn.ModuleList(ConnectionLayer(config) for _ in config.v_biattention_id)
        self.with_coattention = config.with_coattention
        self.schedule = list(zip(config.t_biattention_id, config.v_biattention_id))

    @property
    def text_only_layers(self) -> int:
        """Text layers that run before the first co-attention block: their output depends on the text alone."""
        return self.schedule[0][0] if self.schedule else len(self.layer)

    def text_prefix(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The text stream through its text-only layers: [B, L, H] -> [B, L, H]. `forward(..., text_done=
        text_only_layers)` continues from it exactly as `forward` from the embeddings would."""
        for layer in self.layer[: self.text_only_layers]:
            text = layer(text, text_mask)
        return text

    def forward(
        self, text: torch.Tensor, visual: torch.Tensor, text_mask: torch.Tensor, visual_mask: torch.Tensor,
        text_done: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """text [B, L, H], visual [B, R, V], additive masks [B, 1, 1, L] / [B, 1, 1, R] -> final states.
        text_done: text layers already run on `text` (0, or text_only_layers after `text_prefix`)."""
        if text_done > self.text_only_layers:
            raise ValueError(f"only the {self.text_only_layers} text-only layers can run ahead, not {text_done}")
        t_done, v_done = text_done, 0
        for block, (t_end, v_end) in zip(self.c_layer, self.schedule):
            for layer in self.layer[t_done:t_end]:
                text = layer(text, text_mask)
            for layer in self.v_layer[v_done:v_end]:
                visual = layer(visual, visual_mask)
            t_done, v_done = t_end, v_end
            if self.with_coattention:
                visual, text = block(visual, visual_mask, text, text_mask)
        for layer in self.v_layer[v_done:]:
            visual = layer(visual, visual_mask)
        for layer in self.layer[t_done:]:
            text = layer(text, text_mask)
        return text, visual


class Pooler(nn.Module):
    """Reads position 0 ([CLS] or the global region) through a ReLU projection into the fusion space."""

    def __init__(self, width: int, out_width: int):
        super().__init__()
        self.dense = nn.Linear(width, out_width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, C]"""
        return F.relu(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """The ViLBERT trunk (`bert.*` keys): embeddings of both streams, the encoder and both poolers."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.v_embeddings = BertImageEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.t_pooler = Pooler(config.hidden_size, config.bi_hidden_size)
        self.v_pooler = Pooler(config.v_hidden_size, config.bi_hidden_size)
        self.task_specific_tokens = config.task_specific_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        spatials: torch.Tensor,
        token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_attention_mask: torch.Tensor,
        task_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns text states [B, L, H], visual states [B, R, V], pooled text [B, C], pooled visual [B, C]."""
        text = self.embeddings(input_ids, token_type_ids, task_ids)
        if self.task_specific_tokens:
            # The task token is always attended to; it sits at index 1, after [CLS].
            ones = attention_mask.new_ones(attention_mask.shape[0], 1)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        visual = self.v_embeddings(features, spatials)
        text_mask = additive_mask(attention_mask, text.dtype)
        visual_mask = additive_mask(image_attention_mask, visual.dtype)
        text, visual = self.encoder(text, visual, text_mask, visual_mask)
        return text, visual, self.t_pooler(text), self.v_pooler(visual)

    def encode_text(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor,
                    task_ids: torch.Tensor | None) -> "TextPrefix":
        """What depends on the text alone, computed once to pair it with many images (`forward_with_text`):
        the embeddings and the text-only layers. input_ids etc. [1, L0]."""
        text = self.embeddings(input_ids, token_type_ids, task_ids)
        if self.task_specific_tokens:
            ones = attention_mask.new_ones(attention_mask.shape[0], 1)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        text_mask = additive_mask(attention_mask, text.dtype)
        return TextPrefix(self.encoder.text_prefix(text, text_mask), text_mask, self.encoder.text_only_layers)

    def forward_with_text(self, prefix: "TextPrefix", features: torch.Tensor, spatials: torch.Tensor,
                          image_attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for one text (its prefix, [1, L, H]) against B images: features [B, R, D], spatials
        [B, R, 5], image_attention_mask [B, R] -> pooled text [B, C], pooled visual [B, C]. The text prefix is
        broadcast, not recomputed; each row equals `forward` on that text and image."""
        batch = features.shape[0]
        text = prefix.states.expand(batch, -1, -1)
        text_mask = prefix.mask.expand(batch, -1, -1, -1)
        visual = self.v_embeddings(features, spatials)
        visual_mask = additive_mask(image_attention_mask, visual.dtype)
        text, visual = self.encoder(text, visual, text_mask, visual_mask, text_done=prefix.layers_done)
        return self.t_pooler(text), self.v_pooler(visual)


@dataclass
class TextPrefix:
    """One text through the text-only part of ViLBERT (BertModel.encode_text)."""

    states: torch.Tensor  # [1, L, H] after the text-only layers
    mask: torch.Tensor  # [1, 1, 1, L] additive attention mask
    layers_done: int  # text layers already run


# --------------------------------------------------------------------------------------------------------------
# Heads


class PredictionTransform(nn.Module):
    def __init__(self, width: int, act: str):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = activation(act)
        self.LayerNorm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(hidden)))


class MaskedLanguageModelHead(nn.Module):
    """`cls.predictions`: word prediction with the decoder tied to the word embeddings."""

    def __init__(self, config: ViLBertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = PredictionTransform(config.hidden_size, config.hidden_act)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """[B, L, H] -> [B, L, vocab]"""
        return self.decoder(self.transform(text)) + self.bias


class RegionPredictionHead(nn.Module):
    """`cls.imagePredictions`: masked-region class prediction (1601 Visual Genome classes)."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.transform = PredictionTransform(config.v_hidden_size, config.v_hidden_act)
        self.decoder = nn.Linear(config.v_hidden_size, config.v_target_size)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """[B, R, V] -> [B, R, v_target_size]"""
        return self.decoder(self.transform(visual))


class PreTrainingHeads(nn.Module):
    """`cls.*`: the pre-training objectives. No fine-tuned task reads them; they run only when asked for."""

    def __init__(self, config: ViLBertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = MaskedLanguageModelHead(config, word_embeddings)
        self.bi_seq_relationship = nn.Linear(config.bi_hidden_size, 2)
        self.imagePredictions = RegionPredictionHead(config)


class SimpleClassifier(nn.Module):
    """Linear -> GeLU -> LayerNorm -> Linear, stored as `logit_fc.{0,2,3}` (index 1 is the parameter-free GeLU)."""

    def __init__(self, in_width: int, hidden: int, out: int):
        super().__init__()
        self.logit_fc = nn.Sequential(
            nn.Linear(in_width, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=LAYER_NORM_EPS), nn.Linear(hidden, out)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logit_fc(hidden)


@dataclass
class ViLBertOutput:
    """Outputs of one forward pass. Shapes: B batch, L text length incl. task token, R regions."""

    vil_prediction: torch.Tensor  # [B, 3129] VQA / Genome QA answer logits
    vil_prediction_gqa: torch.Tensor  # [B, 1533] GQA answer logits
    vil_logit: torch.Tensor  # [B, 1] image-text match score (retrieval)
    vil_tri_prediction: torch.Tensor  # [B, 3] contradiction / neutral / entailment
    vision_logit: torch.Tensor  # [B, R, 1] per-region grounding score, padded regions at -10000
    linguisic_logit: torch.Tensor  # [B, L, 1]
    pooled_output: torch.Tensor  # [B, C] fused representation every vil_* head reads
    vil_binary_prediction: torch.Tensor | None = None  # [B/2, 2] NLVR2 over row pairs (2i, 2i+1), only with pairs
    vision_prediction: torch.Tensor | None = None  # [B, R, 1601] only with output_pretraining_heads
    linguisic_prediction: torch.Tensor | None = None  # [B, L, vocab] only with output_pretraining_heads
    seq_relationship: torch.Tensor | None = None  # [B, 2] only with output_pretraining_heads


class ViLBertForVLTasks(nn.Module):
    """ViLBERT with the twelve task heads of the 12-in-1 release.

    Head sizes are fixed (3129 VQA answers, 1533 GQA answers) exactly as in the released checkpoint."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(0.1)
        self.cls = PreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        width = config.bi_hidden_size
        self.vil_prediction = SimpleClassifier(width, width * 2, VQA_NUM_ANSWERS)
        self.vil_prediction_gqa = SimpleClassifier(width, width * 2, GQA_NUM_ANSWERS)
        self.vil_binary_prediction = SimpleClassifier(width * 2, width * 2, 2)
        self.vil_logit = nn.Linear(width, 1)
        self.vil_tri_prediction = nn.Linear(width, 3)
        self.vision_logit = nn.Linear(config.v_hidden_size, 1)
        self.linguisic_logit = nn.Linear(config.hidden_size, 1)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def fuse(self, pooled_text: torch.Tensor, pooled_visual: torch.Tensor) -> torch.Tensor:
        """[B, C] x [B, C] -> [B, C] fused representation."""
        if self.config.fusion_method == "sum":
            return self.dropout(pooled_text + pooled_visual)
        return self.dropout(pooled_text * pooled_visual)

    def retrieval_logits(self, prefix: TextPrefix, features: torch.Tensor, spatials: torch.Tensor,
                         image_attention_mask: torch.Tensor) -> torch.Tensor:
        """The retrieval head (`vil_logit`) of one text against B images, the text side computed once
        (BertModel.encode_text): features [B, R, D], spatials [B, R, 5], image_attention_mask [B, R] -> [B]."""
        pooled_text, pooled_visual = self.bert.forward_with_text(prefix, features, spatials, image_attention_mask)
        return self.vil_logit(self.fuse(pooled_text, pooled_visual))[:, 0]

    def pair_prediction(self, pooled_output: torch.Tensor) -> torch.Tensor:
        """NLVR2 head: pooled [2P, C], rows (2i, 2i+1) are one statement with its two images -> [P, 2]."""
        if pooled_output.shape[0] % 2:
            raise ValueError("the NLVR2 head needs image pairs: an even number of rows (2i, 2i+1)")
        return self.vil_binary_prediction(pooled_output.reshape(-1, pooled_output.shape[1] * 2))

    def forward(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        spatials: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        output_pretraining_heads: bool = False,
        pairs: bool = False,
    ) -> ViLBertOutput:
        """input_ids [B, L0] long, features [B, R, 2048], spatials [B, R, 5], token_type_ids [B, L0],
        attention_mask [B, L0] (1 = real token), image_attention_mask [B, R] (1 = real region),
        task_ids [B, 1] long (required when the model has task tokens).
        pairs: the rows are NLVR2 pairs (2i, 2i+1); only then is the pair head computed (an even B is needed).
        Without it, rows of unrelated requests in one batch are never paired."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_attention_mask is None:
            image_attention_mask = features.new_ones(features.shape[:2])
        text, visual, pooled_text, pooled_visual = self.bert(
            input_ids, features, spatials, token_type_ids, attention_mask, image_attention_mask, task_ids
        )
        pooled = self.fuse(pooled_text, pooled_visual)
        region_mask = ((1.0 - image_attention_mask.to(visual.dtype)) * MASK_VALUE).unsqueeze(2)
        output = ViLBertOutput(
            vil_prediction=self.vil_prediction(pooled),
            vil_prediction_gqa=self.vil_prediction_gqa(pooled),
            vil_logit=self.vil_logit(pooled),
            vil_tri_prediction=self.vil_tri_prediction(pooled),
            vision_logit=self.vision_logit(self.dropout(visual)) + region_mask,
            linguisic_logit=self.linguisic_logit(self.dropout(text)),
            pooled_output=pooled,
            vil_binary_prediction=self.pair_prediction(pooled) if pairs else None,
        )
        if output_pretraining_heads:
            output.linguisic_prediction = self.cls.predictions(text)
            output.vision_prediction = self.cls.imagePredictions(visual)
            output.seq_relationship = self.cls.bi_seq_relationship(self.fuse(pooled_text, pooled_visual))
        return output
