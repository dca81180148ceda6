"""ViLBERT configuration, read from the official JSON format (`config/bert_base_6layer_6conect.json`).

Loading follows the reference: every field starts at the reference constructor default, then each JSON key is
written over it. Keys the model never reads (`bi_intermediate_size`, `bi_attention_type`, `pooling_method`, …)
are kept as attributes and written back by `to_dict`, so a config round-trips unchanged.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# Heads whose sizes the reference hard-codes whatever the config says (its `num_labels` is ignored).
VQA_NUM_ANSWERS = 3129
GQA_NUM_ANSWERS = 1533
NUM_TASK_EMBEDDINGS = 20


@dataclass
class ViLBertConfig:
    """Hyper-parameters of the two-stream ViLBERT. Defaults are the reference constructor's."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02

    v_feature_size: int = 2048
    v_target_size: int = 1601
    v_hidden_size: int = 768
    v_num_hidden_layers: int = 3
    v_num_attention_heads: int = 12
    v_intermediate_size: int = 3072
    v_hidden_act: str = "gelu"
    v_hidden_dropout_prob: float = 0.1
    v_attention_probs_dropout_prob: float = 0.1
    v_initializer_range: float = 0.2

    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 16
    v_biattention_id: list[int] = field(default_factory=lambda: [0, 1])
    t_biattention_id: list[int] = field(default_factory=lambda: [10, 11])

    fusion_method: str = "mul"
    task_specific_tokens: bool = False
    with_coattention: bool = True
    visual_target: int = 0
    fast_mode: bool = False
    fixed_v_layer: int = 0
    fixed_t_layer: int = 0
    in_batch_pairs: bool = False
    dynamic_attention: bool = False
    objective: int = 0
    num_negative: int = 128
    model: str = "bert"
    visualization: bool = False

    # Keys present in official JSON files that no module reads; anything else unknown lands here too.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for settings this implementation cannot build."""
        if len(self.v_biattention_id) != len(self.t_biattention_id):
            raise ValueError(
                "v_biattention_id and t_biattention_id must have the same length "
                f"(got {len(self.v_biattention_id)} and {len(self.t_biattention_id)})"
            )
        if self.v_biattention_id and max(self.v_biattention_id) >= self.v_num_hidden_layers:
            raise ValueError("v_biattention_id refers to a visual layer that does not exist")
        if self.t_biattention_id and max(self.t_biattention_id) >= self.num_hidden_layers:
            raise ValueError("t_biattention_id refers to a text layer that does not exist")
        for width, heads, name in (
            (self.hidden_size, self.num_attention_heads, "hidden_size"),
            (self.v_hidden_size, self.v_num_attention_heads, "v_hidden_size"),
            (self.bi_hidden_size, self.bi_num_attention_heads, "bi_hidden_size"),
        ):
            if width % heads:
                raise ValueError(f"{name}={width} is not divisible by its number of heads ({heads})")
        if self.fusion_method not in ("mul", "sum"):
            raise ValueError(f"fusion_method must be 'mul' or 'sum', got {self.fusion_method!r}")
        for act in (self.hidden_act, self.v_hidden_act):
            if act not in ("gelu", "relu"):
                raise ValueError(f"unsupported activation {act!r} (expected 'gelu' or 'relu')")
        if self.model != "bert":
            raise ValueError(f"only the BERT text stream is supported, got model={self.model!r}")
        if self.dynamic_attention:
            raise ValueError("dynamic_attention is not supported (the released model does not use it)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ViLBertConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: copy.deepcopy(v) for k, v in values.items() if k in known}
        extra = {k: copy.deepcopy(v) for k, v in values.items() if k not in known and k != "extra"}
        extra.update(values.get("extra", {}))
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ViLBertConfig":
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object of config keys")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        extra = values.pop("extra")
        values.update(extra)
        return values

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
