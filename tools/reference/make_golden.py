#!/usr/bin/python3
"""Generate the golden files that the .NET training code is checked against.

Plain PyTorch (no transformers / safetensors packages needed).  The models
follow the semantics of Hugging Face's GPT2LMHeadModel and LlamaForCausalLM
(eager attention) and the training loop follows the semantics described in
tools/reference/README.md (token-weighted gradient accumulation, global grad
norm clipping, torch.optim.AdamW with two parameter groups, LambdaLR with HF's
linear / cosine warmup schedules).  Training runs in float64; the float32
initial weights are converted exactly, the final weights are written as F32.

The OPT cases follow HF's OPTForCausalLM: opt-cosine with post-norm layers and
project_in / project_out (word_embed_proj_dim != hidden_size), opt-pre-linear with
the common pre-norm layout; learned positions at row p + 2, a tied head, and the
token embedding's padding row (pad_token_id) without lookup gradient.

The LoRA cases (gpt2-lora, llama-lora) follow PEFT's LoRA semantics: a target
projection computes base(x) + (lora_alpha / r) * B(A(x)) with A [r, in] and
B [out, r]; the base weights are frozen and only A and B are optimized.  The
initial and final adapters are written in PEFT's adapter format.

The prefix-tuning cases (gpt2-prefix, llama-prefix) follow PEFT's PREFIX_TUNING
without projection: one tensor prompt_embeddings [N, num_layers * 2 * token_dim]
(token_dim = head_dim * num_key_value_heads) is split as PEFT's get_prompt
splits it into every layer's past keys and values; each token attends to all N
prefix positions, positions start at N (no rotary on the prefix keys), and only
the prefix is optimized.

Usage:  /usr/bin/python3 tools/reference/make_golden.py --out tests/golden
"""

import argparse
import json
import math
import os
import platform
import random
import shutil
import struct
import sys

import torch
import torch.nn.functional as F

SCRIPT_COMMAND = "/usr/bin/python3 tools/reference/make_golden.py --out tests/golden"

# --------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------

GPT2_CONFIG = {
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.0,
    "bos_token_id": 95,
    "embd_pdrop": 0.0,
    "eos_token_id": 95,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_embd": 32,
    "n_head": 4,
    "n_inner": None,
    "n_layer": 2,
    "n_positions": 64,
    "reorder_and_upcast_attn": False,
    "resid_pdrop": 0.0,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True,
    "summary_activation": None,
    "summary_first_dropout": 0.0,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 96,
}

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 8,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 96,
}

# The LLaMA variants (HF Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM) share
# llama_param_shapes / llama_forward; what sets them apart is read from the config
# (see llama_variant).  Qwen2: q/k/v biases, tied head.  Qwen3: head_dim (12) unlike
# hidden / heads (8), per-head q_norm / k_norm before the rotary embedding.  Mistral: a
# sliding window of 8 keys, shorter than the rows (up to 32 tokens).
QWEN2_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "max_window_layers": 2,
    "model_type": "qwen2",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 64,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 96,
}

QWEN3_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 12,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "max_window_layers": 2,
    "model_type": "qwen3",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 96,
}

MISTRAL_CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 8,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "model_type": "mistral",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 8,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 96,
}

# BLOOM with six heads (not a power of two: ALiBi's extra slopes) and the pre-norm residual.
BLOOM_CONFIG = {
    "apply_residual_connection_post_layernorm": False,
    "architectures": ["BloomForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_dropout": 0.0,
    "hidden_size": 48,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "bloom",
    "n_head": 6,
    "n_layer": 2,
    "pretraining_tp": 1,
    "slow_but_exact": False,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 96,
}

# BLOOM with the residual taken after each layer norm, written with the legacy and alias keys
# (n_embed, num_attention_heads, num_hidden_layers) that BloomConfig also reads.
BLOOM_POSTLN_CONFIG = {
    "apply_residual_connection_post_layernorm": True,
    "architectures": ["BloomForCausalLM"],
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "bloom",
    "n_embed": 36,
    "num_attention_heads": 6,
    "num_hidden_layers": 2,
    "torch_dtype": "float32",
    "vocab_size": 96,
}

MODEL_SEEDS = {"gpt2": 20240601, "llama": 20240602, "qwen2": 20240621, "qwen3": 20240622, "mistral": 20240623}
MODEL_SEEDS["bloom"] = 20240603
MODEL_SEEDS["bloom_postln"] = 20240604
# OPT (OPTForCausalLM) with its distinctive features on: post-norm layers (do_layer_norm_before false,
# as opt-350m: no final LayerNorm) and project_in / project_out (word_embed_proj_dim 24 != hidden 32).
OPT_CONFIG = {
    "_remove_final_layer_norm": False,
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "architectures": ["OPTForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "do_layer_norm_before": False,
    "dropout": 0.0,
    "enable_bias": True,
    "eos_token_id": 2,
    "ffn_dim": 64,
    "hidden_size": 32,
    "init_std": 0.02,
    "layer_norm_elementwise_affine": True,
    "layerdrop": 0.0,
    "max_position_embeddings": 64,
    "model_type": "opt",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 1,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 96,
    "word_embed_proj_dim": 24,
}

# The common OPT layout (125m, 1.3b, ...): pre-norm layers, a final LayerNorm, no projections.
OPT_PRE_CONFIG = dict(OPT_CONFIG, do_layer_norm_before=True, word_embed_proj_dim=32)

MODEL_SEEDS["opt"] = 20240621
MODEL_SEEDS["opt-pre"] = 20240622
DATA_SEED = 4242
DATA_ROWS = 13          # 13 rows / batch 2 -> 7 micro-batches per epoch (last has 1 row)
DATA_MIN_LEN = 2
DATA_MAX_LEN = 40

BASE_OPTIONS = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": None,   # set per case
    "learning_rate": 3e-3,
    "weight_decay": 0.1,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "adam_epsilon": 1e-8,
    "lr_scheduler_type": None,             # set per case
    "num_warmup_steps": 2,
    "max_steps": 10,
    "max_grad_norm": None,                 # set per case
    "max_seq_len": 32,
    "no_shuffle": True,
    "seed": 1234,
}

QWEN2_MAX_GRAD_NORM = 1.0
QWEN3_MAX_GRAD_NORM = 1.1
MISTRAL_MAX_GRAD_NORM = 1.06
BLOOM_MAX_GRAD_NORM = 1.0          # clips 3 of 10 steps, each pre-clip norm >= 8% away
BLOOM_POSTLN_MAX_GRAD_NORM = 1.05   # clips 4 of 10 steps, each pre-clip norm >= 7% away
BLOOM_LORA_MAX_GRAD_NORM = 0.0028   # LoRA norms ~0.002..0.003: clips 3 of 10, each >= 8% away
OPT_MAX_GRAD_NORM = 0.17
OPT_PRE_MAX_GRAD_NORM = 1.6

# (case name, family, scheduler, gradient_accumulation_steps, max_grad_norm)
# max_grad_norm was chosen so that clipping triggers on some steps but not all
# (see the summary table the script prints).
CASES = [
    ("gpt2-cosine", "gpt2", "cosine", 3, 1.0),
    ("gpt2-linear", "gpt2", "linear", 2, 1.4),
    ("llama-cosine", "llama", "cosine", 3, 1.0),
    ("llama-linear", "llama", "linear", 2, 1.0),
    ("qwen2-linear", "qwen2", "linear", 3, QWEN2_MAX_GRAD_NORM),
    ("qwen3-cosine", "qwen3", "cosine", 3, QWEN3_MAX_GRAD_NORM),
    ("mistral-cosine", "mistral", "cosine", 2, MISTRAL_MAX_GRAD_NORM),
    ("bloom-cosine", "bloom", "cosine", 3, BLOOM_MAX_GRAD_NORM),
    ("bloom-postln-linear", "bloom_postln", "linear", 2, BLOOM_POSTLN_MAX_GRAD_NORM),
    ("opt-cosine", "opt", "cosine", 3, OPT_MAX_GRAD_NORM),
    ("opt-pre-linear", "opt-pre", "linear", 2, OPT_PRE_MAX_GRAD_NORM),
]

# LoRA cases: PEFT LoRA on a frozen base (the family's initial model).  Unlike
# PEFT (which initialises B to zero) both A and B are random, so the adapter
# changes the output from step 1 and the golden exercises the B path.
LORA_R = 4
LORA_ALPHA = 8
LORA_INIT_STD = 0.05
LORA_SEEDS = {"gpt2": 20240611, "llama": 20240612}
LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
LORA_FAN_IN_FAN_OUT = {"gpt2": True, "llama": False}   # GPT-2 Conv1D stores weight as [in, out]
LORA_SEEDS["bloom"] = 20240615
LORA_TARGETS["bloom"] = ["query_key_value"]      # PEFT's default for BLOOM
LORA_FAN_IN_FAN_OUT["bloom"] = False

# (case name, family, scheduler, gradient_accumulation_steps, max_grad_norm)
# The global norm over the LoRA parameters alone is small (~0.02 for GPT-2,
# ~0.06..0.10 for LLaMA), so 1.0 would never clip; these thresholds clip some
# steps but not all, each at least 6% away from every pre-clip norm.
LORA_CASES = [
    ("gpt2-lora", "gpt2", "cosine", 3, 0.0215),
    ("llama-lora", "llama", "cosine", 2, 0.09),
    ("bloom-lora", "bloom", "cosine", 3, BLOOM_LORA_MAX_GRAD_NORM),
]

# Prefix-tuning cases: PEFT PREFIX_TUNING (no projection) on a frozen base, the
# prefix drawn from normal(0, 1) as PEFT's nn.Embedding.
PREFIX_TOKENS = 4
PREFIX_LEARNING_RATE = 0.03     # the prefix is O(1): a larger step than the models' makes it move
PREFIX_MAX_GRAD_NORM_GPT2 = 0.0052     # clips 3 of 10 steps, each pre-clip norm >= 19% away
PREFIX_MAX_GRAD_NORM_LLAMA = 0.0135    # clips 2 of 10 steps, each pre-clip norm >= 11% away
PREFIX_SEEDS = {"gpt2": 20240613, "llama": 20240614}
PREFIX_SEEDS["bloom"] = 20240616
BLOOM_PREFIX_MAX_GRAD_NORM = 0.0004   # clips 3 of 10 steps, each pre-clip norm >= 20% away
PREFIX_CASES = [
    ("gpt2-prefix", "gpt2", "cosine", 3, PREFIX_MAX_GRAD_NORM_GPT2),
    ("llama-prefix", "llama", "cosine", 2, PREFIX_MAX_GRAD_NORM_LLAMA),
    ("bloom-prefix", "bloom", "cosine", 3, BLOOM_PREFIX_MAX_GRAD_NORM),
]

# Sequence-classification and reward-model cases (HF's LlamaForSequenceClassification):
# the LLaMA init without lm_head plus score.weight (num_labels, hidden) drawn from
# normal(0, initializer_range); logits at the rightmost token whose id is not
# pad_token_id; cross-entropy (classification) or -log sigmoid(r_chosen - r_rejected)
# (reward) summed over the window's examples / pairs and divided by their count.
HEAD_PAD_ID = 0                 # no text holds it: ids are drawn from 1..95
HEAD_SEEDS = {"classification": 20240621, "reward": 20240622}
HEAD_DATA_SEED = 4343
CLASSIFICATION_LABELS = ["negative", "neutral", "positive"]
CLASSIFICATION_ROWS = 13        # batch 2, accumulation 3: windows of 3, 3 and 1 micro-batches
REWARD_PAIRS = 9                # batch 2, accumulation 2: windows of 2, 2 and 1 micro-batches
# (case name, task, scheduler, gradient_accumulation_steps, max_grad_norm, learning_rate)
HEAD_CASES = [
    ("llama-classification", "sequence-classification", "linear", 3, 15.4, 3e-4),
    ("llama-reward", "reward-model", "cosine", 2, 20.5, 3e-4),
]


def head_config(task):
    cfg = dict(LLAMA_CONFIG)
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    cfg["pad_token_id"] = HEAD_PAD_ID
    labels = CLASSIFICATION_LABELS if task == "sequence-classification" else ["LABEL_0"]
    cfg["id2label"] = {str(i): l for i, l in enumerate(labels)}
    cfg["label2id"] = {l: i for i, l in enumerate(labels)}
    if task == "sequence-classification":
        cfg["problem_type"] = "single_label_classification"
    return cfg


def head_init(task, base):
    cfg = LLAMA_CONFIG
    labels = len(CLASSIFICATION_LABELS) if task == "sequence-classification" else 1
    params = {n: t for n, t in base.items() if n != "lm_head.weight"}
    g = torch.Generator().manual_seed(HEAD_SEEDS["classification" if labels > 1 else "reward"])
    params["score.weight"] = torch.randn(labels, cfg["hidden_size"], generator=g, dtype=torch.float64).mul(
        cfg["initializer_range"] * 10).to(torch.float32)   # 10x HF's std: the head moves the loss from step 1
    return params


def head_rows(rng, n):
    return [[rng.randrange(1, 96) for _ in range(rng.randint(DATA_MIN_LEN, DATA_MAX_LEN))] for _ in range(n)]


def head_data(task):
    rng = random.Random(HEAD_DATA_SEED + (0 if task == "sequence-classification" else 1))
    if task == "sequence-classification":
        rows = head_rows(rng, CLASSIFICATION_ROWS)
        labels = [rng.randrange(len(CLASSIFICATION_LABELS)) for _ in rows]
        return [{"input_ids": r, "label": CLASSIFICATION_LABELS[l]} for r, l in zip(rows, labels)]
    chosen, rejected = head_rows(rng, REWARD_PAIRS), head_rows(rng, REWARD_PAIRS)
    return [{"input_ids_chosen": c, "input_ids_rejected": r} for c, r in zip(chosen, rejected)]


def pooled_scores(params, ids):
    """HF's *ForSequenceClassification logits: score of the rightmost non-pad token."""
    p = dict(params)
    p["lm_head.weight"] = params["score.weight"]          # per-position scores (B, T, num_labels)
    scores = llama_forward(p, LLAMA_CONFIG, ids)
    T = ids.shape[1]
    last = (torch.arange(T)[None, :] * (ids != HEAD_PAD_ID).long()).argmax(-1)
    return scores[torch.arange(ids.shape[0]), last]


def pad_rows(rows, L):
    rows = [r[:L] for r in rows]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), HEAD_PAD_ID, dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids


def train_head(task, init_f32, data, opts, dtype):
    params = {n: t.to(dtype).clone().requires_grad_(True) for n, t in init_f32.items()}
    order = list(params)
    decay = [params[n] for n in order if not no_decay(n)]
    nodecay = [params[n] for n in order if no_decay(n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opts["weight_decay"]}, {"params": nodecay, "weight_decay": 0.0}],
        lr=opts["learning_rate"], betas=(opts["adam_beta1"], opts["adam_beta2"]),
        eps=opts["adam_epsilon"], weight_decay=opts["weight_decay"], foreach=False)
    lam = {"linear": linear_lambda, "cosine": cosine_lambda}[opts["lr_scheduler_type"]](
        opts["num_warmup_steps"], opts["max_steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    L, bs = opts["max_seq_len"], opts["per_device_train_batch_size"]
    mbs = [data[s:s + bs] for s in range(0, len(data), bs)]
    epoch_windows = windows(mbs, opts["gradient_accumulation_steps"])
    label_id = {l: i for i, l in enumerate(CLASSIFICATION_LABELS)}
    steps, step = [], 0
    while step < opts["max_steps"]:
        for win in epoch_windows:
            if step >= opts["max_steps"]:
                break
            step += 1
            n = sum(len(mb) for mb in win)
            total = 0.0
            for mb in win:
                if task == "sequence-classification":
                    logits = pooled_scores(params, pad_rows([r["input_ids"] for r in mb], L))
                    labels = torch.tensor([label_id[r["label"]] for r in mb], dtype=torch.long)
                    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
                else:
                    rows = [r["input_ids_chosen"] for r in mb] + [r["input_ids_rejected"] for r in mb]
                    r = pooled_scores(params, pad_rows(rows, L)).squeeze(-1)
                    loss_sum = -F.logsigmoid(r[:len(mb)] - r[len(mb):]).sum()
                (loss_sum / n).backward()
                total += loss_sum.item()
            gnorm = torch.nn.utils.clip_grad_norm_([params[k] for k in order], opts["max_grad_norm"])
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            steps.append({"step": step, "loss": total / n, "lr": float(lr), "grad_norm": float(gnorm)})
    return steps, {k: params[k].detach() for k in order}

# --------------------------------------------------------------------------
# safetensors (hand written)
# --------------------------------------------------------------------------


def write_safetensors(path, tensors):
    """tensors: dict name -> tensor.  Written as little-endian F32, names sorted."""
    names = sorted(tensors)
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name in names:
        t = tensors[name].detach().to(torch.float32).contiguous().cpu()
        data = t.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    import numpy as np
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32"
        b, e = info["data_offsets"]
        arr = np.frombuffer(raw[base + b:base + e], dtype="<f4").reshape(info["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out

# --------------------------------------------------------------------------
# Models (functional, parameters held in an ordered dict with HF names)
# --------------------------------------------------------------------------


def gpt2_param_shapes(cfg):
    """Parameter names in HF module registration order, with shapes and init kind."""
    d, V, P, L = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"]
    inner = cfg["n_inner"] or 4 * d
    std = cfg["initializer_range"]
    proj_std = std / math.sqrt(2 * L)
    spec = [("transformer.wte.weight", (V, d), ("normal", std)),
            ("transformer.wpe.weight", (P, d), ("normal", std))]
    for i in range(L):
        p = "transformer.h.%d." % i
        spec += [
            (p + "ln_1.weight", (d,), ("ones",)),
            (p + "ln_1.bias", (d,), ("zeros",)),
            (p + "attn.c_attn.weight", (d, 3 * d), ("normal", std)),
            (p + "attn.c_attn.bias", (3 * d,), ("zeros",)),
            (p + "attn.c_proj.weight", (d, d), ("normal", proj_std)),
            (p + "attn.c_proj.bias", (d,), ("zeros",)),
            (p + "ln_2.weight", (d,), ("ones",)),
            (p + "ln_2.bias", (d,), ("zeros",)),
            (p + "mlp.c_fc.weight", (d, inner), ("normal", std)),
            (p + "mlp.c_fc.bias", (inner,), ("zeros",)),
            (p + "mlp.c_proj.weight", (inner, d), ("normal", proj_std)),
            (p + "mlp.c_proj.bias", (d,), ("zeros",)),
        ]
    spec += [("transformer.ln_f.weight", (d,), ("ones",)),
             ("transformer.ln_f.bias", (d,), ("zeros",))]
    return spec


def llama_variant(cfg):
    """What the LLaMA-shaped families add, from the config as HF's classes read it:
    (head_dim, q/k/v bias, o_proj bias, q/k norms, sliding window or None, tied head).
    Qwen2 biases q/k/v always (never o_proj); LLaMA and Qwen3 bias q/k/v/o when
    attention_bias; Qwen3 has q_norm / k_norm; Mistral has sliding_window (key j is seen by
    query i when i - sliding_window < j <= i, as transformers' sliding_window_overlay)."""
    mt = cfg["model_type"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    attention_bias = mt in ("llama", "qwen3") and cfg.get("attention_bias", False)
    qkv_bias = mt == "qwen2" or attention_bias
    window = cfg.get("sliding_window") if mt == "mistral" else None
    if mt in ("qwen2", "qwen3"):
        assert not cfg.get("use_sliding_window", False)
    return hd, qkv_bias, attention_bias, mt == "qwen3", window, cfg.get("tie_word_embeddings", False)


def llama_param_shapes(cfg):
    d, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, qkv_bias, o_bias, qk_norm, _, tied = llama_variant(cfg)
    inter = cfg["intermediate_size"]
    std = cfg["initializer_range"]
    # Biases and q/k norm weights are drawn (not HF's zeros / ones) so that the initial
    # forward (forward.safetensors) depends on them too.
    bias = ("normal", std)
    spec = [("model.embed_tokens.weight", (V, d), ("normal", std))]
    for i in range(L):
        p = "model.layers.%d." % i
        for m, width in (("q_proj", H * hd), ("k_proj", KV * hd), ("v_proj", KV * hd)):
            spec.append((p + "self_attn.%s.weight" % m, (width, d), ("normal", std)))
            if qkv_bias:
                spec.append((p + "self_attn.%s.bias" % m, (width,), bias))
        spec.append((p + "self_attn.o_proj.weight", (d, H * hd), ("normal", std)))
        if o_bias:
            spec.append((p + "self_attn.o_proj.bias", (d,), bias))
        if qk_norm:
            spec += [(p + "self_attn.q_norm.weight", (hd,), ("near_one", 0.1)),
                     (p + "self_attn.k_norm.weight", (hd,), ("near_one", 0.1))]
        spec += [
            (p + "mlp.gate_proj.weight", (inter, d), ("normal", std)),
            (p + "mlp.up_proj.weight", (inter, d), ("normal", std)),
            (p + "mlp.down_proj.weight", (d, inter), ("normal", std)),
            (p + "input_layernorm.weight", (d,), ("ones",)),
            (p + "post_attention_layernorm.weight", (d,), ("ones",)),
        ]
    spec.append(("model.norm.weight", (d,), ("ones",)))
    if not tied:
        spec.append(("lm_head.weight", (V, d), ("normal", std)))
    return spec


def init_params(spec, seed):
    """Seeded float32 init; returns an ordered dict name -> float32 tensor."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape, kind in spec:
        if kind[0] == "normal":
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, kind[1], generator=gen)
        elif kind[0] == "normal_pad":      # nn.Embedding(padding_idx): the padding row starts at zero
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, kind[1], generator=gen)
            t[kind[2]] = 0.0
        elif kind[0] == "near_one":
            t = 1.0 + torch.empty(shape, dtype=torch.float32).normal_(0.0, kind[1], generator=gen)
        elif kind[0] == "ones":
            t = torch.ones(shape, dtype=torch.float32)
        else:
            t = torch.zeros(shape, dtype=torch.float32)
        out[name] = t
    return out


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def causal_mask(T, device):
    return torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))


def lora_delta(lora, module, x):
    """PEFT LoRA path of one target module: lora_B(lora_A(x)) * (alpha / r)
    (dropout 0: identity).  A is [r, in], B is [out, r], both nn.Linear weights."""
    A, B = lora["tensors"][module]
    return F.linear(F.linear(x, A), B) * lora["scaling"]


def prefix_past(prefix, batch, layers, heads):
    """PEFT's get_prompt: prompt_embeddings [N, layers * 2 * token_dim] repeated over the
    batch, viewed (B, N, layers * 2, heads, head_dim), permuted to (layers * 2, B, heads, N,
    head_dim) and split in pairs: per layer (key, value), each (B, heads, N, head_dim)."""
    n, width = prefix.shape
    past = prefix.repeat(batch, 1, 1).view(batch, n, layers * 2, heads, width // (layers * 2 * heads))
    past = past.permute([2, 0, 3, 1, 4]).split(2)
    return [(kv[0], kv[1]) for kv in past]


def prefix_mask(T, n):
    """Token queries over [prefix; tokens] keys: every prefix position, tokens causally."""
    return torch.cat((torch.ones(T, n, dtype=torch.bool), causal_mask(T, None)), dim=1)


def gpt2_forward(p, cfg, input_ids, lora=None, prefix=None):
    B, T = input_ids.shape
    d, H = cfg["n_embd"], cfg["n_head"]
    hd = d // H
    eps = cfg["layer_norm_epsilon"]
    n = 0 if prefix is None else prefix.shape[0]
    pos = torch.arange(n, n + T)
    h = p["transformer.wte.weight"][input_ids] + p["transformer.wpe.weight"][pos][None]
    mask = causal_mask(T, h.device) if prefix is None else prefix_mask(T, n)
    past = None if prefix is None else prefix_past(prefix, B, cfg["n_layer"], H)
    for i in range(cfg["n_layer"]):
        pre = "transformer.h.%d." % i
        x = F.layer_norm(h, (d,), p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], eps)
        qkv = x @ p[pre + "attn.c_attn.weight"] + p[pre + "attn.c_attn.bias"]   # Conv1D
        if lora is not None and pre + "attn.c_attn" in lora["tensors"]:
            qkv = qkv + lora_delta(lora, pre + "attn.c_attn", x)
        q, k, v = qkv.split(d, dim=2)
        q = q.view(B, T, H, hd).permute(0, 2, 1, 3)
        k = k.view(B, T, H, hd).permute(0, 2, 1, 3)
        v = v.view(B, T, H, hd).permute(0, 2, 1, 3)
        if past is not None:
            k = torch.cat((past[i][0], k), dim=2)
            v = torch.cat((past[i][1], v), dim=2)
        w = (q @ k.transpose(-1, -2)) / torch.full([], hd ** 0.5, dtype=q.dtype)
        w = torch.where(mask, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype))
        w = torch.softmax(w, dim=-1)
        a = (w @ v).permute(0, 2, 1, 3).reshape(B, T, d)
        a = a @ p[pre + "attn.c_proj.weight"] + p[pre + "attn.c_proj.bias"]
        h = h + a
        x = F.layer_norm(h, (d,), p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], eps)
        m = gelu_new(x @ p[pre + "mlp.c_fc.weight"] + p[pre + "mlp.c_fc.bias"])
        m = m @ p[pre + "mlp.c_proj.weight"] + p[pre + "mlp.c_proj.bias"]
        h = h + m
    h = F.layer_norm(h, (d,), p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    return h @ p["transformer.wte.weight"].t()          # tied head


def rms_norm(x, weight, eps):
    # HF upcasts to float32; in float64 training we keep float64 (never downcast).
    in_dtype = x.dtype
    xc = x.to(torch.float32) if in_dtype not in (torch.float32, torch.float64) else x
    var = xc.pow(2).mean(-1, keepdim=True)
    xc = xc * torch.rsqrt(var + eps)
    return weight * xc.to(in_dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def llama_forward(p, cfg, input_ids, lora=None, prefix=None):
    B, T = input_ids.shape
    d = cfg["hidden_size"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, qkv_bias, o_bias, qk_norm, window, tied = llama_variant(cfg)
    rep = H // KV
    eps = cfg["rms_norm_eps"]
    dtype = p["model.embed_tokens.weight"].dtype
    # rotary tables: computed in float64 then cast to the working dtype
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    n = 0 if prefix is None else prefix.shape[0]
    freqs = torch.arange(n, n + T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype)[None, None], emb.sin().to(dtype)[None, None]
    scaling = hd ** -0.5
    mask = causal_mask(T, None) if prefix is None else prefix_mask(T, n)
    if window is not None:
        assert prefix is None, "no prefix golden for a sliding window"
        i_pos = torch.arange(T)[:, None]
        j_pos = torch.arange(T)[None, :]
        mask = mask & (i_pos - j_pos < window)
    past = None if prefix is None else prefix_past(prefix, B, cfg["num_hidden_layers"], KV)
    h = p["model.embed_tokens.weight"][input_ids]
    for i in range(cfg["num_hidden_layers"]):
        pre = "model.layers.%d." % i
        x = rms_norm(h, p[pre + "input_layernorm.weight"], eps)
        if lora is None and not qkv_bias:
            q = (x @ p[pre + "self_attn.q_proj.weight"].t()).view(B, T, H, hd).transpose(1, 2)
            k = (x @ p[pre + "self_attn.k_proj.weight"].t()).view(B, T, KV, hd).transpose(1, 2)
            v = (x @ p[pre + "self_attn.v_proj.weight"].t()).view(B, T, KV, hd).transpose(1, 2)
        else:
            proj = {}
            for m in ("q_proj", "k_proj", "v_proj"):
                y = x @ p[pre + "self_attn.%s.weight" % m].t()
                if qkv_bias:
                    y = y + p[pre + "self_attn.%s.bias" % m]
                if lora is not None and pre + "self_attn." + m in lora["tensors"]:
                    y = y + lora_delta(lora, pre + "self_attn." + m, x)
                proj[m] = y
            q = proj["q_proj"].view(B, T, H, hd).transpose(1, 2)
            k = proj["k_proj"].view(B, T, KV, hd).transpose(1, 2)
            v = proj["v_proj"].view(B, T, KV, hd).transpose(1, 2)
        if qk_norm:                   # Qwen3: RMSNorm over each head's head_dim, before rotary
            q = rms_norm(q, p[pre + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, p[pre + "self_attn.k_norm.weight"], eps)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:          # prefix keys as stored: no rotary
            k = torch.cat((past[i][0], k), dim=2)
            v = torch.cat((past[i][1], v), dim=2)
        S = k.shape[2]
        # GQA: query head j uses key/value head j // rep
        k = k[:, :, None].expand(B, KV, rep, S, hd).reshape(B, H, S, hd)
        v = v[:, :, None].expand(B, KV, rep, S, hd).reshape(B, H, S, hd)
        w = (q @ k.transpose(2, 3)) * scaling
        w = torch.where(mask, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype))
        w = torch.softmax(w, dim=-1)
        a = (w @ v).transpose(1, 2).reshape(B, T, H * hd)
        o = a @ p[pre + "self_attn.o_proj.weight"].t()
        if o_bias:
            o = o + p[pre + "self_attn.o_proj.bias"]
        h = h + o
        x = rms_norm(h, p[pre + "post_attention_layernorm.weight"], eps)
        g = F.silu(x @ p[pre + "mlp.gate_proj.weight"].t())
        u = x @ p[pre + "mlp.up_proj.weight"].t()
        h = h + (g * u) @ p[pre + "mlp.down_proj.weight"].t()
    h = rms_norm(h, p["model.norm.weight"], eps)
    return h @ p["model.embed_tokens.weight" if tied else "lm_head.weight"].t()


def bloom_dims(cfg):
    """(hidden, heads, layers) as BloomConfig reads them: n_embed over hidden_size, and the
    attribute_map aliases num_attention_heads / num_hidden_layers."""
    d = cfg["n_embed"] if cfg.get("n_embed") is not None else cfg["hidden_size"]
    H = cfg["n_head"] if "n_head" in cfg else cfg["num_attention_heads"]
    L = cfg["n_layer"] if "n_layer" in cfg else cfg["num_hidden_layers"]
    return d, H, L


def bloom_param_shapes(cfg):
    d, _, L = bloom_dims(cfg)
    V = cfg["vocab_size"]
    std = cfg["initializer_range"]
    spec = [("transformer.word_embeddings.weight", (V, d), ("normal", std)),
            ("transformer.word_embeddings_layernorm.weight", (d,), ("ones",)),
            ("transformer.word_embeddings_layernorm.bias", (d,), ("zeros",))]
    for i in range(L):
        p = "transformer.h.%d." % i
        spec += [
            (p + "input_layernorm.weight", (d,), ("ones",)),
            (p + "input_layernorm.bias", (d,), ("zeros",)),
            (p + "self_attention.query_key_value.weight", (3 * d, d), ("normal", std)),
            (p + "self_attention.query_key_value.bias", (3 * d,), ("zeros",)),
            (p + "self_attention.dense.weight", (d, d), ("normal", std)),
            (p + "self_attention.dense.bias", (d,), ("zeros",)),
            (p + "post_attention_layernorm.weight", (d,), ("ones",)),
            (p + "post_attention_layernorm.bias", (d,), ("zeros",)),
            (p + "mlp.dense_h_to_4h.weight", (4 * d, d), ("normal", std)),
            (p + "mlp.dense_h_to_4h.bias", (4 * d,), ("zeros",)),
            (p + "mlp.dense_4h_to_h.weight", (d, 4 * d), ("normal", std)),
            (p + "mlp.dense_4h_to_h.bias", (d,), ("zeros",)),
        ]
    spec += [("transformer.ln_f.weight", (d,), ("ones",)),
             ("transformer.ln_f.bias", (d,), ("zeros",))]
    return spec


def alibi_slopes(n_head):
    """build_alibi_tensor's slopes, float32 as HF computes them: base^1..base^n for the largest power
    of two n <= n_head, then the odd powers of the 2n-head base for the remaining heads."""
    closest = 2 ** math.floor(math.log2(n_head))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != n_head:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, n_head - closest)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))])
    return slopes


def bloom_gelu(x):
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def bloom_forward(p, cfg, input_ids, lora=None, prefix=None):
    """BloomForCausalLM with an all-ones attention mask: ALiBi's key positions are
    (cumsum(mask) - 1) * mask = 0 .. N + T - 1 (the prefix's N first), added to q.k / sqrt(hd)
    (baddbmm, beta 1); the fused projection is viewed (B, T, heads, 3, hd)."""
    B, T = input_ids.shape
    d, H, L = bloom_dims(cfg)
    hd = d // H
    eps = cfg["layer_norm_epsilon"]
    post = cfg.get("apply_residual_connection_post_layernorm", False)
    n = 0 if prefix is None else prefix.shape[0]
    ln = lambda x, name: F.layer_norm(x, (d,), p[name + ".weight"], p[name + ".bias"], eps)
    h = ln(p["transformer.word_embeddings.weight"][input_ids], "transformer.word_embeddings_layernorm")
    alibi = alibi_slopes(H).to(h.dtype)[:, None] * torch.arange(n + T, dtype=h.dtype)[None, :]   # (H, S)
    mask = causal_mask(T, None) if prefix is None else prefix_mask(T, n)
    past = None if prefix is None else prefix_past(prefix, B, L, H)
    inv_norm = 1.0 / math.sqrt(hd)
    for i in range(L):
        pre = "transformer.h.%d." % i
        x = ln(h, pre + "input_layernorm")
        residual = x if post else h
        qkv = x @ p[pre + "self_attention.query_key_value.weight"].t() + p[pre + "self_attention.query_key_value.bias"]
        if lora is not None and pre + "self_attention.query_key_value" in lora["tensors"]:
            qkv = qkv + lora_delta(lora, pre + "self_attention.query_key_value", x)
        qkv = qkv.view(B, T, H, 3, hd)
        q, k, v = (qkv[:, :, :, j].transpose(1, 2) for j in range(3))      # (B, H, T, hd)
        if past is not None:
            k = torch.cat((past[i][0], k), dim=2)
            v = torch.cat((past[i][1], v), dim=2)
        w = alibi[None, :, None, :] + (q @ k.transpose(-1, -2)) * inv_norm
        w = torch.where(mask, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype))
        w = torch.softmax(w, dim=-1)
        a = (w @ v).transpose(1, 2).reshape(B, T, d)
        a = a @ p[pre + "self_attention.dense.weight"].t() + p[pre + "self_attention.dense.bias"]
        h = residual + a
        x = ln(h, pre + "post_attention_layernorm")
        residual = x if post else h
        m = bloom_gelu(x @ p[pre + "mlp.dense_h_to_4h.weight"].t() + p[pre + "mlp.dense_h_to_4h.bias"])
        m = m @ p[pre + "mlp.dense_4h_to_h.weight"].t() + p[pre + "mlp.dense_4h_to_h.bias"]
        h = residual + m
    h = ln(h, "transformer.ln_f")
    return h @ p["transformer.word_embeddings.weight"].t()          # tied head
def opt_param_shapes(cfg):
    """OPTForCausalLM's parameters in HF registration order (OPTDecoder: embed_tokens, embed_positions,
    project_out, project_in, final_layer_norm, layers; OPTAttention: k, v, q, out); the head is tied."""
    d, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    E, ffn, std = cfg["word_embed_proj_dim"], cfg["ffn_dim"], cfg["init_std"]
    spec = [("model.decoder.embed_tokens.weight", (V, E), ("normal_pad", std, cfg["pad_token_id"])),
            ("model.decoder.embed_positions.weight", (cfg["max_position_embeddings"] + 2, d), ("normal", std))]
    if E != d:
        spec += [("model.decoder.project_out.weight", (E, d), ("normal", std)),
                 ("model.decoder.project_in.weight", (d, E), ("normal", std))]
    if cfg["do_layer_norm_before"] and not cfg["_remove_final_layer_norm"]:
        spec += [("model.decoder.final_layer_norm.weight", (d,), ("ones",)),
                 ("model.decoder.final_layer_norm.bias", (d,), ("zeros",))]
    for i in range(L):
        p = "model.decoder.layers.%d." % i
        for m in ("k_proj", "v_proj", "q_proj", "out_proj"):
            spec += [(p + "self_attn.%s.weight" % m, (d, d), ("normal", std)),
                     (p + "self_attn.%s.bias" % m, (d,), ("zeros",))]
        spec += [
            (p + "self_attn_layer_norm.weight", (d,), ("ones",)),
            (p + "self_attn_layer_norm.bias", (d,), ("zeros",)),
            (p + "fc1.weight", (ffn, d), ("normal", std)),
            (p + "fc1.bias", (ffn,), ("zeros",)),
            (p + "fc2.weight", (d, ffn), ("normal", std)),
            (p + "fc2.bias", (d,), ("zeros",)),
            (p + "final_layer_norm.weight", (d,), ("ones",)),
            (p + "final_layer_norm.bias", (d,), ("zeros",)),
        ]
    return spec


def opt_forward(p, cfg, input_ids, lora=None, prefix=None):
    """OPTForCausalLM (eager attention, dropout 0) on an all-ones attention mask: positions are
    cumsum(mask) * mask - 1 (with a prefix of n virtual tokens: n .. n + T - 1), read at row p + 2 of
    embed_positions; the token embedding is nn.Embedding(padding_idx=pad_token_id) (no gradient for
    that row); project_in after the token lookup, project_out before the tied head; q scaled by
    head_dim ** -0.5 before q k^T; pre-norm or post-norm layers per do_layer_norm_before."""
    B, T = input_ids.shape
    d, H, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    hd = d // H
    before = cfg["do_layer_norm_before"]
    n = 0 if prefix is None else prefix.shape[0]
    ones = torch.ones(B, n + T, dtype=torch.long)
    pos = (torch.cumsum(ones, dim=1) * ones - 1)[:, n:]
    wte = p["model.decoder.embed_tokens.weight"]
    x = F.embedding(input_ids, wte, padding_idx=cfg["pad_token_id"])
    if "model.decoder.project_in.weight" in p:
        x = x @ p["model.decoder.project_in.weight"].t()
    h = x + F.embedding(pos + 2, p["model.decoder.embed_positions.weight"])
    mask = causal_mask(T, None) if prefix is None else prefix_mask(T, n)
    past = None if prefix is None else prefix_past(prefix, B, L, H)

    def linear(x, name):
        y = x @ p[name + ".weight"].t()
        if cfg["enable_bias"]:
            y = y + p[name + ".bias"]
        if lora is not None and name in lora["tensors"]:
            y = y + lora_delta(lora, name, x)
        return y

    def layer_norm(x, name):
        return F.layer_norm(x, (d,), p.get(name + ".weight"), p.get(name + ".bias"), 1e-5)

    for i in range(L):
        pre = "model.decoder.layers.%d." % i
        residual = h
        x = layer_norm(h, pre + "self_attn_layer_norm") if before else h
        q = (linear(x, pre + "self_attn.q_proj") * hd ** -0.5).view(B, T, H, hd).transpose(1, 2)
        k = linear(x, pre + "self_attn.k_proj").view(B, T, H, hd).transpose(1, 2)
        v = linear(x, pre + "self_attn.v_proj").view(B, T, H, hd).transpose(1, 2)
        if past is not None:
            k = torch.cat((past[i][0], k), dim=2)
            v = torch.cat((past[i][1], v), dim=2)
        w = q @ k.transpose(2, 3)
        w = torch.where(mask, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype))
        w = torch.softmax(w, dim=-1)
        a = (w @ v).transpose(1, 2).reshape(B, T, d)
        h = residual + linear(a, pre + "self_attn.out_proj")
        if not before:
            h = layer_norm(h, pre + "self_attn_layer_norm")
        residual = h
        x = layer_norm(h, pre + "final_layer_norm") if before else h
        m = linear(torch.relu(linear(x, pre + "fc1")), pre + "fc2")
        h = residual + m
        if not before:
            h = layer_norm(h, pre + "final_layer_norm")
    if before and not cfg["_remove_final_layer_norm"]:
        h = layer_norm(h, "model.decoder.final_layer_norm")
    if "model.decoder.project_out.weight" in p:
        h = h @ p["model.decoder.project_out.weight"].t()
    return h @ wte.t()          # tied head


FAMILIES = {
    "gpt2": (GPT2_CONFIG, gpt2_param_shapes, gpt2_forward),
    "llama": (LLAMA_CONFIG, llama_param_shapes, llama_forward),
    "qwen2": (QWEN2_CONFIG, llama_param_shapes, llama_forward),
    "qwen3": (QWEN3_CONFIG, llama_param_shapes, llama_forward),
    "mistral": (MISTRAL_CONFIG, llama_param_shapes, llama_forward),
    "bloom": (BLOOM_CONFIG, bloom_param_shapes, bloom_forward),
    "bloom_postln": (BLOOM_POSTLN_CONFIG, bloom_param_shapes, bloom_forward),
    "opt": (OPT_CONFIG, opt_param_shapes, opt_forward),
    "opt-pre": (OPT_PRE_CONFIG, opt_param_shapes, opt_forward),
}

NO_DECAY_MODULES = ("ln_1", "ln_2", "ln_f", "input_layernorm", "post_attention_layernorm", "norm",
                    "self_attn_layer_norm", "final_layer_norm", "word_embeddings_layernorm", "q_norm", "k_norm")


def no_decay(name):
    parts = name.split(".")
    return name.endswith(".bias") or (len(parts) >= 2 and parts[-2] in NO_DECAY_MODULES)

# --------------------------------------------------------------------------
# LoRA adapters (PEFT format)
# --------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def lora_modules(family, cfg):
    """Target modules in HF registration order: (HF module name, in_features, out_features)."""
    out = []
    if family == "gpt2":
        d = cfg["n_embd"]
        dims = {"c_attn": ("attn.c_attn", d, 3 * d)}
        for i in range(cfg["n_layer"]):
            for t in LORA_TARGETS[family]:
                sub, fin, fout = dims[t]
                out.append(("transformer.h.%d.%s" % (i, sub), fin, fout))
    elif family.startswith("bloom"):
        d, _, L = bloom_dims(cfg)
        for i in range(L):
            out.append(("transformer.h.%d.self_attention.query_key_value" % i, d, 3 * d))
    else:
        d, hd = cfg["hidden_size"], cfg["head_dim"]
        H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        dims = {"q_proj": (d, H * hd), "k_proj": (d, KV * hd), "v_proj": (d, KV * hd)}
        for i in range(cfg["num_hidden_layers"]):
            for t in LORA_TARGETS[family]:
                fin, fout = dims[t]
                out.append(("model.layers.%d.self_attn.%s" % (i, t), fin, fout))
    return out


def lora_key(module, ab):
    return "%s%s.lora_%s.weight" % (PEFT_PREFIX, module, ab)


def init_lora(family, cfg, seed):
    """Seeded float32 adapter, PEFT key names, in registration order (A then B per module)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module, fin, fout in lora_modules(family, cfg):
        out[lora_key(module, "A")] = torch.empty((LORA_R, fin), dtype=torch.float32).normal_(
            0.0, LORA_INIT_STD, generator=gen)
        out[lora_key(module, "B")] = torch.empty((fout, LORA_R), dtype=torch.float32).normal_(
            0.0, LORA_INIT_STD, generator=gen)
    return out


def merged_check(family, cfg, base_f32, adapter_f32, data, opts):
    """Self-check of the LoRA forward: equals the base forward with the adapter merged
    into the weights (W + s * B @ A for nn.Linear [out, in]; its transpose for GPT-2's
    Conv1D [in, out], i.e. fan_in_fan_out), in float64 on the first micro-batch."""
    forward = FAMILIES[family][2]
    base = {n: t.to(torch.float64) for n, t in base_f32.items()}
    scaling = opts["lora_alpha"] / opts["lora_dim"]
    lora = {"scaling": scaling, "tensors": {}}
    merged = dict(base)
    for module, _, _ in lora_modules(family, cfg):
        A = adapter_f32[lora_key(module, "A")].to(torch.float64)
        B = adapter_f32[lora_key(module, "B")].to(torch.float64)
        lora["tensors"][module] = (A, B)
        delta = scaling * (B @ A)
        w = module + ".weight"
        merged[w] = base[w] + (delta.t() if LORA_FAN_IN_FAN_OUT[family] else delta)
    ids = micro_batches(data, opts)[0][0]
    a = forward(base, cfg, ids, lora)
    b = forward(merged, cfg, ids)
    c = forward(base, cfg, ids)
    err = (a - b).abs().max().item()
    effect = (a - c).abs().max().item()
    assert err < 1e-12, err
    assert effect > 1e-3, effect
    return err, effect


def adapter_config(family):
    return {
        "bias": "none",
        "fan_in_fan_out": LORA_FAN_IN_FAN_OUT[family],
        "inference_mode": False,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "peft_type": "LORA",
        "r": LORA_R,
        "target_modules": list(LORA_TARGETS[family]),
        "task_type": "CAUSAL_LM",
    }

# --------------------------------------------------------------------------
# Prefix adapters (PEFT format)
# --------------------------------------------------------------------------


def prefix_shape(family, cfg):
    """PEFT's _prepare_prompt_learning_config: (num_layers, token_dim, num_attention_heads);
    for LLaMA (num_key_value_heads in the config) token_dim = head_dim * kv heads over kv heads."""
    if family == "gpt2":
        return cfg["n_layer"], cfg["n_embd"], cfg["n_head"]
    if family.startswith("bloom"):
        d, H, L = bloom_dims(cfg)
        return L, d, H
    return cfg["num_hidden_layers"], cfg["head_dim"] * cfg["num_key_value_heads"], cfg["num_key_value_heads"]


def init_prefix(family, cfg, seed):
    layers, token_dim, _ = prefix_shape(family, cfg)
    gen = torch.Generator().manual_seed(seed)
    return {"prompt_embeddings": torch.empty((PREFIX_TOKENS, layers * 2 * token_dim), dtype=torch.float32).normal_(
        0.0, 1.0, generator=gen)}


def prefix_config(family, cfg):
    layers, token_dim, heads = prefix_shape(family, cfg)
    return {
        "encoder_hidden_size": token_dim,
        "inference_mode": True,
        "num_attention_heads": heads,
        "num_layers": layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": PREFIX_TOKENS,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": False,
        "task_type": "CAUSAL_LM",
        "token_dim": token_dim,
    }


def prefix_check(family, cfg, base_f32, adapter_f32, data, opts):
    """Self-check of the prefix forward on the first micro-batch, in float64: an empty
    prefix (N = 0) gives exactly the base forward, and the initial prefix changes the logits."""
    forward = FAMILIES[family][2]
    base = {n: t.to(torch.float64) for n, t in base_f32.items()}
    prefix = adapter_f32["prompt_embeddings"].to(torch.float64)
    ids = micro_batches(data, opts)[0][0]
    a = forward(base, cfg, ids, prefix=prefix)
    c = forward(base, cfg, ids)
    empty = forward(base, cfg, ids, prefix=prefix[:0])
    assert torch.equal(empty, c)
    effect = (a - c).abs().max().item()
    assert effect > 1e-3, effect
    return effect

# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def make_data(seed, rows, vocab, max_seq_len):
    rng = random.Random(seed)
    data = []
    for _ in range(rows):
        n = rng.randint(DATA_MIN_LEN, DATA_MAX_LEN)
        data.append([rng.randrange(vocab) for _ in range(n)])
    lengths = [len(r) for r in data]
    assert any(n > max_seq_len for n in lengths), "no row exercises truncation"
    assert any(n <= max_seq_len for n in lengths)
    return data


def micro_batches(data, opts):
    """One epoch of micro-batches: list of (input_ids, labels) LongTensors."""
    L, bs = opts["max_seq_len"], opts["per_device_train_batch_size"]
    rows = [r[:L] for r in data]
    out = []
    for s in range(0, len(rows), bs):
        group = rows[s:s + bs]
        T = max(len(r) for r in group)
        ids = torch.zeros(len(group), T, dtype=torch.long)
        labels = torch.full((len(group), T), -100, dtype=torch.long)
        for j, r in enumerate(group):
            ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
            labels[j, :len(r)] = torch.tensor(r, dtype=torch.long)
        out.append((ids, labels))
    return out


def windows(mbs, k):
    return [mbs[s:s + k] for s in range(0, len(mbs), k)]

# --------------------------------------------------------------------------
# Schedules (HF formulas)
# --------------------------------------------------------------------------


def linear_lambda(warmup, total):
    def f(step):
        if step < warmup:
            return float(step) / float(max(1, warmup))
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    return f


def cosine_lambda(warmup, total, num_cycles=0.5):
    def f(step):
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))
    return f

# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def train(family, init_f32, data, opts, dtype, lora_f32=None, prefix_f32=None):
    """Full training, or (lora_f32 given) LoRA training of the adapter, or (prefix_f32
    given) training of the prefix, on the frozen base init_f32.  Returns (steps, final
    trainable tensors by name)."""
    cfg, _, forward = FAMILIES[family]
    lora = None
    prefix = None
    if prefix_f32 is not None:
        params = {n: t.to(dtype).clone() for n, t in init_f32.items()}          # frozen
        trainable = {n: t.to(dtype).clone().requires_grad_(True) for n, t in prefix_f32.items()}
        prefix = trainable["prompt_embeddings"]
    elif lora_f32 is None:
        params = {n: t.to(dtype).clone().requires_grad_(True) for n, t in init_f32.items()}
        trainable = params
    else:
        params = {n: t.to(dtype).clone() for n, t in init_f32.items()}          # frozen
        trainable = {n: t.to(dtype).clone().requires_grad_(True) for n, t in lora_f32.items()}
        lora = {"scaling": opts["lora_alpha"] / opts["lora_dim"], "tensors": {}}
        for module, _, _ in lora_modules(family, cfg):
            lora["tensors"][module] = (trainable[lora_key(module, "A")], trainable[lora_key(module, "B")])
        assert len(lora["tensors"]) * 2 == len(trainable)
    order = list(trainable)
    decay = [trainable[n] for n in order if not no_decay(n)]
    nodecay = [trainable[n] for n in order if no_decay(n)]
    groups = [{"params": decay, "weight_decay": opts["weight_decay"]},
              {"params": nodecay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=opts["learning_rate"], betas=(opts["adam_beta1"], opts["adam_beta2"]),
        eps=opts["adam_epsilon"], weight_decay=opts["weight_decay"], foreach=False)
    lam = {"linear": linear_lambda, "cosine": cosine_lambda}[opts["lr_scheduler_type"]](
        opts["num_warmup_steps"], opts["max_steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)

    epoch_windows = windows(micro_batches(data, opts), opts["gradient_accumulation_steps"])
    steps = []
    step = 0
    while step < opts["max_steps"]:
        for win in epoch_windows:
            if step >= opts["max_steps"]:
                break
            step += 1
            n_tok = sum(int((lab[:, 1:] != -100).sum()) for _, lab in win)
            total = 0.0
            for ids, lab in win:
                if prefix is not None:
                    logits = forward(params, cfg, ids, prefix=prefix)
                else:
                    logits = forward(params, cfg, ids) if lora is None else forward(params, cfg, ids, lora)
                V = logits.shape[-1]
                loss_sum = F.cross_entropy(logits[:, :-1].reshape(-1, V), lab[:, 1:].reshape(-1),
                                           ignore_index=-100, reduction="sum")
                (loss_sum / n_tok).backward()
                total += loss_sum.item()
            gnorm = torch.nn.utils.clip_grad_norm_([trainable[n] for n in order], opts["max_grad_norm"])
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            steps.append({"step": step, "loss": total / n_tok, "lr": float(lr),
                          "grad_norm": float(gnorm)})
    final = {n: trainable[n].detach() for n in order}
    return steps, final


def write_forward(path, family, init_f32, data, opts):
    """The initial model's logits on the epoch's first micro-batch (rows 0 and 1, truncated to
    max_seq_len, right-padded with id 0), computed in float64 and stored F32 as "logits" (B, T, V)."""
    cfg, _, forward = FAMILIES[family]
    params = {n: t.to(torch.float64) for n, t in init_f32.items()}
    ids, _ = micro_batches(data, opts)[0]
    with torch.no_grad():
        logits = forward(params, cfg, ids)
    write_safetensors(path, {"logits": logits})

# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def write_json(path, obj):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def rel_diff(a, b):
    """(max |a-b| / max |b|, max |a-b|, max |b|); b is the float64 reference."""
    denom = b.abs().max().item()
    num = (a.to(torch.float64) - b).abs().max().item()
    return (num / denom if denom > 0 else float("inf"), num, denom)


def fp32_report(family, cfg, f32, f64):
    rows = []
    for name in f64:
        a, b = f32[name], f64[name]
        if family == "gpt2" and name.endswith("attn.c_attn.bias"):
            d = cfg["n_embd"]
            for j, part in enumerate("qkv"):
                rows.append(("%s[%s]" % (name, part), rel_diff(a[j * d:(j + 1) * d], b[j * d:(j + 1) * d])))
        elif family == "gpt2" and name.endswith("attn.c_attn.lora_B.weight"):
            d = cfg["n_embd"]          # B is [3*d, r]: rows q, k, v
            for j, part in enumerate("qkv"):
                rows.append(("%s[%s]" % (name, part), rel_diff(a[j * d:(j + 1) * d], b[j * d:(j + 1) * d])))
        elif family == "gpt2" and name.endswith("attn.c_attn.weight"):
            d = cfg["n_embd"]
            for j, part in enumerate("qkv"):
                rows.append(("%s[%s]" % (name, part),
                             rel_diff(a[:, j * d:(j + 1) * d], b[:, j * d:(j + 1) * d])))
        else:
            rows.append((name, rel_diff(a, b)))
    return rows


def golden_readme(summary):
    lines = [
        "# Golden files (generated)",
        "",
        "Generated by `%s`" % SCRIPT_COMMAND,
        "with Python %s, torch %s (CPU, 1 thread), %s." % (
            platform.python_version(), torch.__version__, "float64 training"),
        "Do not edit by hand; see tools/reference/README.md for the exact semantics and formats.",
        "",
        "Each full fine-tuning case folder (`*-cosine`, `*-linear`) holds:",
        "",
        "- `model/config.json`, `model/model.safetensors`: initial model (HF config + HF tensor names, F32).",
        "- `forward.safetensors`: `logits` of the initial model on the first micro-batch (rows 0 and 1, float64 computed, stored F32).",
        "- `data.jsonl`: training rows, one `{\"input_ids\": [...]}` per line.",
        "- `options.json`: training options (HF snake_case names).",
        "- `steps.jsonl`: one line per optimizer step: step, loss, lr, grad_norm (pre-clip).",
        "- `final/config.json`, `final/model.safetensors`: weights after `max_steps` steps (float64 training, stored F32).",
        "",
        "Each LoRA case folder (`*-lora`) holds:",
        "",
        "- `model/config.json`, `model/model.safetensors`: the frozen base model (same files as the family's `-cosine` case).",
        "- `adapter/adapter_config.json`, `adapter/adapter_model.safetensors`: initial adapter in PEFT's format (F32).",
        "- `data.jsonl`, `options.json` (with `lora_dim`, `lora_alpha`, `lora_target_modules`, `only_optimize_lora`), `steps.jsonl`: as above.",
        "- `final/adapter_config.json`, `final/adapter_model.safetensors`: adapter after `max_steps` steps (float64 training, stored F32).",
        "",
        "Each prefix-tuning case folder (`*-prefix`) holds:",
        "",
        "- `model/config.json`, `model/model.safetensors`: the frozen base model (same files as the family's `-cosine` case).",
        "- `adapter/adapter_config.json`, `adapter/adapter_model.safetensors`: initial prefix in PEFT's format (`prompt_embeddings`, F32).",
        "- `data.jsonl`, `options.json` (with `prefix_tuning`, `num_prefix_tokens`), `steps.jsonl`: as above.",
        "- `final/adapter_config.json`, `final/adapter_model.safetensors`: prefix after `max_steps` steps (float64 training, stored F32).",
        "",
        "Each head case folder (`llama-classification`, `llama-reward`) holds a LlamaForSequenceClassification",
        "(`model/`: the LLaMA init without `lm_head`, plus `score.weight`; `pad_token_id` 0, absent from the data),",
        "`data.jsonl` (`input_ids` + `label` names; TRL's `input_ids_chosen` / `input_ids_rejected`), `options.json`",
        "(with `task`), `steps.jsonl` and `final/` as the full fine-tuning cases.",
        "",
        "| case | steps | first loss | last loss | clipped steps |",
        "|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append("| %s | %d | %.6f | %.6f | %d of %d |" % row)
    lines += [
        "",
        "The folder `resize-embeddings/` is generated by `/usr/bin/python3 tools/reference/make_resize_golden.py --out tests/golden`:",
        "`resize.json` holds 40 old embedding rows (width 16, F32), the seed, and the 5 rows PyTorch's",
        "`MultivariateNormal(mean, covariance_matrix=1e-9 * cov).sample((5,))` draws right after `torch.manual_seed(seed)`",
        "(HF's mean-resizing rule for added tokens).",
    ]
    return "\n".join(lines) + "\n"


def report_case(case, steps, mgn, summary):
    clipped = sum(1 for s in steps if s["grad_norm"] > mgn)
    summary.append((case, len(steps), steps[0]["loss"], steps[-1]["loss"], clipped, len(steps)))
    print("%s" % case)
    for s in steps:
        print("  step %2d  loss %.6f  lr %.6e  grad_norm %.6f%s" % (
            s["step"], s["loss"], s["lr"], s["grad_norm"], "  (clipped)" if s["grad_norm"] > mgn else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden")
    ap.add_argument("--skip-fp32-check", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)

    init = {}
    for fam, (cfg, spec_fn, _) in FAMILIES.items():
        init[fam] = init_params(spec_fn(cfg), MODEL_SEEDS[fam])
    data = make_data(DATA_SEED, DATA_ROWS, 96, BASE_OPTIONS["max_seq_len"])

    summary = []
    fp32_rows = {}
    for case, fam, sched, gas, mgn in CASES:
        cfg = FAMILIES[fam][0]
        opts = dict(BASE_OPTIONS)
        opts.update(lr_scheduler_type=sched, gradient_accumulation_steps=gas, max_grad_norm=mgn)
        cdir = os.path.join(args.out, case)
        if os.path.isdir(cdir):
            shutil.rmtree(cdir)
        os.makedirs(os.path.join(cdir, "model"))
        os.makedirs(os.path.join(cdir, "final"))
        write_json(os.path.join(cdir, "model", "config.json"), cfg)
        write_safetensors(os.path.join(cdir, "model", "model.safetensors"), init[fam])
        write_jsonl(os.path.join(cdir, "data.jsonl"), [{"input_ids": r} for r in data])
        write_json(os.path.join(cdir, "options.json"), opts)

        write_forward(os.path.join(cdir, "forward.safetensors"), fam, init[fam], data, opts)

        steps, final = train(fam, init[fam], data, opts, torch.float64)
        write_jsonl(os.path.join(cdir, "steps.jsonl"), steps)
        write_json(os.path.join(cdir, "final", "config.json"), cfg)
        write_safetensors(os.path.join(cdir, "final", "model.safetensors"), final)

        # round-trip check of the hand written safetensors
        back = read_safetensors(os.path.join(cdir, "model", "model.safetensors"))
        assert set(back) == set(init[fam])
        assert all(torch.equal(back[n], init[fam][n]) for n in back)

        report_case(case, steps, mgn, summary)

        if not args.skip_fp32_check:
            steps32, final32 = train(fam, init[fam], data, opts, torch.float32)
            fp32_rows[case] = (fp32_report(fam, cfg, final32, final),
                               max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(steps32, steps)))

    for case, fam, sched, gas, mgn in LORA_CASES:
        cfg = FAMILIES[fam][0]
        opts = dict(BASE_OPTIONS)
        opts.update(lr_scheduler_type=sched, gradient_accumulation_steps=gas, max_grad_norm=mgn,
                    lora_dim=LORA_R, lora_alpha=LORA_ALPHA,
                    lora_target_modules=list(LORA_TARGETS[fam]), only_optimize_lora=True)
        adapter = init_lora(fam, cfg, LORA_SEEDS[fam])
        merge_err, effect = merged_check(fam, cfg, init[fam], adapter, data, opts)
        cdir = os.path.join(args.out, case)
        if os.path.isdir(cdir):
            shutil.rmtree(cdir)
        for sub in ("model", "adapter", "final"):
            os.makedirs(os.path.join(cdir, sub))
        write_json(os.path.join(cdir, "model", "config.json"), cfg)
        write_safetensors(os.path.join(cdir, "model", "model.safetensors"), init[fam])
        write_json(os.path.join(cdir, "adapter", "adapter_config.json"), adapter_config(fam))
        write_safetensors(os.path.join(cdir, "adapter", "adapter_model.safetensors"), adapter)
        write_jsonl(os.path.join(cdir, "data.jsonl"), [{"input_ids": r} for r in data])
        write_json(os.path.join(cdir, "options.json"), opts)

        steps, final = train(fam, init[fam], data, opts, torch.float64, lora_f32=adapter)
        write_jsonl(os.path.join(cdir, "steps.jsonl"), steps)
        write_json(os.path.join(cdir, "final", "adapter_config.json"), adapter_config(fam))
        write_safetensors(os.path.join(cdir, "final", "adapter_model.safetensors"), final)

        back = read_safetensors(os.path.join(cdir, "adapter", "adapter_model.safetensors"))
        assert set(back) == set(adapter)
        assert all(torch.equal(back[n], adapter[n]) for n in back)

        report_case(case, steps, mgn, summary)
        print("  initial adapter: max|logits(lora) - logits(merged)| %.3e, max|logits(lora) - logits(base)| %.3e"
              % (merge_err, effect))

        if not args.skip_fp32_check:
            steps32, final32 = train(fam, init[fam], data, opts, torch.float32, lora_f32=adapter)
            fp32_rows[case] = (fp32_report(fam, cfg, final32, final),
                               max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(steps32, steps)))

    for case, fam, sched, gas, mgn in PREFIX_CASES:
        cfg = FAMILIES[fam][0]
        opts = dict(BASE_OPTIONS)
        opts.update(lr_scheduler_type=sched, gradient_accumulation_steps=gas, max_grad_norm=mgn,
                    learning_rate=PREFIX_LEARNING_RATE, prefix_tuning=True, num_prefix_tokens=PREFIX_TOKENS)
        adapter = init_prefix(fam, cfg, PREFIX_SEEDS[fam])
        effect = prefix_check(fam, cfg, init[fam], adapter, data, opts)
        cdir = os.path.join(args.out, case)
        if os.path.isdir(cdir):
            shutil.rmtree(cdir)
        for sub in ("model", "adapter", "final"):
            os.makedirs(os.path.join(cdir, sub))
        write_json(os.path.join(cdir, "model", "config.json"), cfg)
        write_safetensors(os.path.join(cdir, "model", "model.safetensors"), init[fam])
        write_json(os.path.join(cdir, "adapter", "adapter_config.json"), prefix_config(fam, cfg))
        write_safetensors(os.path.join(cdir, "adapter", "adapter_model.safetensors"), adapter)
        write_jsonl(os.path.join(cdir, "data.jsonl"), [{"input_ids": r} for r in data])
        write_json(os.path.join(cdir, "options.json"), opts)

        steps, final = train(fam, init[fam], data, opts, torch.float64, prefix_f32=adapter)
        write_jsonl(os.path.join(cdir, "steps.jsonl"), steps)
        write_json(os.path.join(cdir, "final", "adapter_config.json"), prefix_config(fam, cfg))
        write_safetensors(os.path.join(cdir, "final", "adapter_model.safetensors"), final)

        report_case(case, steps, mgn, summary)
        print("  initial prefix: max|logits(prefix) - logits(base)| %.3e" % effect)

        if not args.skip_fp32_check:
            steps32, final32 = train(fam, init[fam], data, opts, torch.float32, prefix_f32=adapter)
            fp32_rows[case] = (fp32_report(fam, cfg, final32, final),
                               max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(steps32, steps)))

    for case, task, sched, gas, mgn, lr in HEAD_CASES:
        opts = dict(BASE_OPTIONS)
        opts.update(lr_scheduler_type=sched, gradient_accumulation_steps=gas, max_grad_norm=mgn,
                    learning_rate=lr, task=task)
        cfg = head_config(task)
        start = head_init(task, init["llama"])
        data = head_data(task)
        cdir = os.path.join(args.out, case)
        if os.path.isdir(cdir):
            shutil.rmtree(cdir)
        for sub in ("model", "final"):
            os.makedirs(os.path.join(cdir, sub))
        write_json(os.path.join(cdir, "model", "config.json"), cfg)
        write_safetensors(os.path.join(cdir, "model", "model.safetensors"), start)
        write_jsonl(os.path.join(cdir, "data.jsonl"), data)
        write_json(os.path.join(cdir, "options.json"), opts)
        steps, final = train_head(task, start, data, opts, torch.float64)
        write_jsonl(os.path.join(cdir, "steps.jsonl"), steps)
        write_json(os.path.join(cdir, "final", "config.json"), cfg)
        write_safetensors(os.path.join(cdir, "final", "model.safetensors"), final)
        report_case(case, steps, mgn, summary)

    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(golden_readme(summary))

    print()
    print("%-14s %5s %12s %12s %8s" % ("case", "steps", "first loss", "last loss", "clipped"))
    for row in summary:
        print("%-14s %5d %12.6f %12.6f %4d/%-3d" % row)

    if fp32_rows:
        print()
        print("fp32 vs fp64 final weights, per tensor: rel = max|w32-w64| / max|w64|")
        for case, (rows, lossdiff) in fp32_rows.items():
            print("%s  (max relative loss difference over steps: %.3e)" % (case, lossdiff))
            width = max(46, max(len(name) for name, _ in rows))
            print("  %-*s %10s %10s %10s" % (width, "tensor", "rel", "max|diff|", "max|w64|"))
            for name, (r, num, den) in rows:
                print("  %-*s %10.3e %10.3e %10.3e" % (width, name, r, num, den))


if __name__ == "__main__":
    sys.exit(main())
