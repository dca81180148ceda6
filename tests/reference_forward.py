"""An independent, purely functional ViLBERT forward written from the reference description (fact sheet §3).

It reads raw state-dict tensors and spells every step out with explicit matmuls, softmax and LayerNorm
formulas, sharing no code with `vilbert.modeling`. Tests compare the module implementation against it.
"""

from __future__ import annotations

import math

import torch


def layer_norm(x, weight, bias, eps=1e-12):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(sd, name, x):
    return x @ sd[name + ".weight"].t() + sd[name + ".bias"]


def multi_head(q, k, v, mask_add, heads):
    b, nq, width = q.shape
    nk = k.shape[1]
    d = width // heads
    q = q.view(b, nq, heads, d).permute(0, 2, 1, 3)
    k = k.view(b, nk, heads, d).permute(0, 2, 1, 3)
    v = v.view(b, nk, heads, d).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mask_add
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v).permute(0, 2, 1, 3).reshape(b, nq, width)


def self_layer(sd, p, x, mask_add, heads):
    ctx = multi_head(linear(sd, p + "attention.self.query", x), linear(sd, p + "attention.self.key", x),
                     linear(sd, p + "attention.self.value", x), mask_add, heads)
    a = layer_norm(linear(sd, p + "attention.output.dense", ctx) + x,
                   sd[p + "attention.output.LayerNorm.weight"], sd[p + "attention.output.LayerNorm.bias"])
    h = gelu(linear(sd, p + "intermediate.dense", a))
    return layer_norm(linear(sd, p + "output.dense", h) + a, sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"])


def co_layer(sd, p, v, t, v_mask_add, t_mask_add, heads):
    b = p + "biattention."
    # text queries attend to regions; region queries attend to words
    text_ctx = multi_head(linear(sd, b + "query2", t), linear(sd, b + "key1", v), linear(sd, b + "value1", v), v_mask_add, heads)
    vis_ctx = multi_head(linear(sd, b + "query1", v), linear(sd, b + "key2", t), linear(sd, b + "value2", t), t_mask_add, heads)
    o = p + "biOutput."
    v1 = layer_norm(linear(sd, o + "dense1", vis_ctx) + v, sd[o + "LayerNorm1.weight"], sd[o + "LayerNorm1.bias"])
    t1 = layer_norm(linear(sd, o + "dense2", text_ctx) + t, sd[o + "LayerNorm2.weight"], sd[o + "LayerNorm2.bias"])
    v2 = layer_norm(linear(sd, p + "v_output.dense", gelu(linear(sd, p + "v_intermediate.dense", v1))) + v1,
                    sd[p + "v_output.LayerNorm.weight"], sd[p + "v_output.LayerNorm.bias"])
    t2 = layer_norm(linear(sd, p + "t_output.dense", gelu(linear(sd, p + "t_intermediate.dense", t1))) + t1,
                    sd[p + "t_output.LayerNorm.weight"], sd[p + "t_output.LayerNorm.bias"])
    return v2, t2


def simple_classifier(sd, p, x):
    h = gelu(linear(sd, p + "logit_fc.0", x))
    h = layer_norm(h, sd[p + "logit_fc.2.weight"], sd[p + "logit_fc.2.bias"])
    return linear(sd, p + "logit_fc.3", h)


def reference_forward(sd, cfg, input_ids, features, spatials, token_type_ids, attention_mask, image_attention_mask, task_ids):
    """Returns a dict of the reference outputs (vil_binary_prediction only for even batches)."""
    batch, length = input_ids.shape
    emb = (sd["bert.embeddings.word_embeddings.weight"][input_ids]
           + sd["bert.embeddings.position_embeddings.weight"][torch.arange(length)][None]
           + sd["bert.embeddings.token_type_embeddings.weight"][token_type_ids])
    task = sd["bert.embeddings.task_embeddings.weight"][task_ids.view(-1)][:, None]
    emb = torch.cat([emb[:, :1], task, emb[:, 1:]], 1)
    t = layer_norm(emb, sd["bert.embeddings.LayerNorm.weight"], sd["bert.embeddings.LayerNorm.bias"])
    text_mask = torch.cat([torch.ones(batch, 1, dtype=attention_mask.dtype), attention_mask], 1).float()
    t_add = ((1.0 - text_mask) * -10000.0)[:, None, None, :]
    v_add = ((1.0 - image_attention_mask.float()) * -10000.0)[:, None, None, :]
    v = layer_norm(linear(sd, "bert.v_embeddings.image_embeddings", features)
                   + linear(sd, "bert.v_embeddings.image_location_embeddings", spatials),
                   sd["bert.v_embeddings.LayerNorm.weight"], sd["bert.v_embeddings.LayerNorm.bias"])
    t_done = v_done = 0
    for k, (t_end, v_end) in enumerate(zip(cfg["t_biattention_id"], cfg["v_biattention_id"])):
        while t_done < t_end:
            t = self_layer(sd, f"bert.encoder.layer.{t_done}.", t, t_add, cfg["num_attention_heads"])
            t_done += 1
        while v_done < v_end:
            v = self_layer(sd, f"bert.encoder.v_layer.{v_done}.", v, v_add, cfg["v_num_attention_heads"])
            v_done += 1
        v, t = co_layer(sd, f"bert.encoder.c_layer.{k}.", v, t, v_add, t_add, cfg["bi_num_attention_heads"])
    while v_done < cfg["v_num_hidden_layers"]:
        v = self_layer(sd, f"bert.encoder.v_layer.{v_done}.", v, v_add, cfg["v_num_attention_heads"])
        v_done += 1
    while t_done < cfg["num_hidden_layers"]:
        t = self_layer(sd, f"bert.encoder.layer.{t_done}.", t, t_add, cfg["num_attention_heads"])
        t_done += 1
    pooled_t = torch.relu(linear(sd, "bert.t_pooler.dense", t[:, 0]))
    pooled_v = torch.relu(linear(sd, "bert.v_pooler.dense", v[:, 0]))
    pooled = pooled_t * pooled_v
    out = {
        "vil_prediction": simple_classifier(sd, "vil_prediction.", pooled),
        "vil_prediction_gqa": simple_classifier(sd, "vil_prediction_gqa.", pooled),
        "vil_logit": linear(sd, "vil_logit", pooled),
        "vil_tri_prediction": linear(sd, "vil_tri_prediction", pooled),
        "vision_logit": linear(sd, "vision_logit", v) + ((1.0 - image_attention_mask.float()) * -10000.0)[:, :, None],
        "linguisic_logit": linear(sd, "linguisic_logit", t),
    }
    if batch % 2 == 0:
        out["vil_binary_prediction"] = simple_classifier(sd, "vil_binary_prediction.", pooled.reshape(batch // 2, -1))
    # pre-training heads
    h = layer_norm(gelu(linear(sd, "cls.predictions.transform.dense", t)),
                   sd["cls.predictions.transform.LayerNorm.weight"], sd["cls.predictions.transform.LayerNorm.bias"])
    out["linguisic_prediction"] = h @ sd["cls.predictions.decoder.weight"].t() + sd["cls.predictions.bias"]
    h = layer_norm(gelu(linear(sd, "cls.imagePredictions.transform.dense", v)),
                   sd["cls.imagePredictions.transform.LayerNorm.weight"], sd["cls.imagePredictions.transform.LayerNorm.bias"])
    out["vision_prediction"] = linear(sd, "cls.imagePredictions.decoder", h)
    return out
