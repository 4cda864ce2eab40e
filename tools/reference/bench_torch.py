#!/usr/bin/python3
"""The PyTorch side of `functional bench train` and `functional bench generation --pytorch`.

HF-style eager GPT-2 and LLaMA (the functional models of make_golden.py, which follow
GPT2LMHeadModel / LlamaForCausalLM with eager attention), trained the way HF's Trainer
does it: forward, mean cross entropy over the shifted labels, backward,
torch.nn.utils.clip_grad_norm_ (max norm 1.0), torch.optim.AdamW (betas 0.9/0.999,
eps 1e-8, weight decay 0), constant learning rate, zero_grad.  bf16 runs the same
loop under torch.autocast("cpu", dtype=torch.bfloat16) with fp32 weights.

The data is the same formula as Functional.Benchmarks.TrainingBenchmark.syntheticToken:
row r, position i -> (r * 7919 + i * 31) % vocab; optimizer step k (from 0, warm-up
steps included) trains on rows k*B .. k*B + B - 1.

Every figure goes to stdout as one JSON document (progress goes to stderr):

    /usr/bin/python3 tools/reference/bench_torch.py train --config gpt2-small --steps 3
    /usr/bin/python3 tools/reference/bench_torch.py train --model-config config.json --batch 4 --seq-len 64
    /usr/bin/python3 tools/reference/bench_torch.py generation --model-config config.json --lengths 32,64
    /usr/bin/python3 tools/reference/bench_torch.py print-data --rows 3 --seq-len 8
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden  # noqa: E402  (the reference models)

VOCAB = 8192

# The configurations of the performance issue; the same numbers as TrainingBenchmark's presets.
PRESETS = {
    "gpt2-small": ({"model_type": "gpt2", "vocab_size": VOCAB, "n_positions": 1024, "n_embd": 384,
                    "n_layer": 6, "n_head": 6}, 8, 128),
    "gpt2-base": ({"model_type": "gpt2", "vocab_size": VOCAB, "n_positions": 1024, "n_embd": 768,
                   "n_layer": 12, "n_head": 12}, 4, 256),
    "llama": ({"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 768, "intermediate_size": 2048,
               "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 1024}, 4, 256),
}

# --------------------------------------------------------------------------
# Configurations (HF config.json fields, HF defaults for the absent ones)
# --------------------------------------------------------------------------


def complete_config(raw):
    """The HF config with the defaults the reference models read filled in."""
    cfg = dict(raw)
    if cfg["model_type"] == "gpt2":
        cfg.setdefault("n_inner", None)
        cfg.setdefault("layer_norm_epsilon", 1e-5)
        cfg.setdefault("initializer_range", 0.02)
        cfg.setdefault("n_positions", 1024)
    elif cfg["model_type"] == "llama":
        cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
        if cfg.get("head_dim") is None:
            cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        cfg.setdefault("rms_norm_eps", 1e-6)
        cfg.setdefault("rope_theta", 10000.0)
        cfg.setdefault("initializer_range", 0.02)
        cfg.setdefault("tie_word_embeddings", False)
    else:
        raise SystemExit("bench_torch.py: unsupported model_type %r" % cfg["model_type"])
    return cfg


def family(cfg):
    return cfg["model_type"]


def build(cfg, seed=1):
    """Parameters (name -> fp32 leaf tensor requiring a gradient) in HF order, HF's init. A tied
    LLaMA head is the embedding tensor itself (listed under both names)."""
    spec = make_golden.FAMILIES[family(cfg)][1](cfg)
    params = {n: t.requires_grad_(True) for n, t in make_golden.init_params(spec, seed).items()}
    if family(cfg) == "llama" and cfg["tie_word_embeddings"]:
        params["lm_head.weight"] = params["model.embed_tokens.weight"]
    return params


def distinct(params):
    """Each parameter tensor once (a tied head appears under two names)."""
    return list({id(t): t for t in params.values()}.values())


def forward(params, cfg, ids):
    return make_golden.FAMILIES[family(cfg)][2](params, cfg, ids)


def shape(cfg):
    """(layers, width, matmul parameters N): every parameter except lookup-only embeddings
    (GPT-2's position table; LLaMA's input embedding, whose head is untied)."""
    if family(cfg) == "gpt2":
        layers, width = cfg["n_layer"], cfg["n_embd"]
        lookup = {"transformer.wpe.weight"}
    else:
        layers, width = cfg["num_hidden_layers"], cfg["hidden_size"]
        # A tied head is the embedding: count that tensor once, as the head.
        lookup = {"lm_head.weight"} if cfg["tie_word_embeddings"] else {"model.embed_tokens.weight"}
    spec = make_golden.FAMILIES[family(cfg)][1](cfg)
    n = sum(math.prod(s) for name, s, _ in spec if name not in lookup)
    return layers, width, n


def flops_per_token(cfg, seq_len):
    """Model FLOPs of one trained token: 6 N + 12 L T d (PaLM, appendix B)."""
    layers, width, n = shape(cfg)
    return 6 * n + 12 * layers * seq_len * width

# --------------------------------------------------------------------------
# Data, memory, matmul peak
# --------------------------------------------------------------------------


def synthetic_token(row, position, vocab):
    return (row * 7919 + position * 31) % vocab


def synthetic_rows(first_row, rows, seq_len, vocab):
    return torch.tensor([[synthetic_token(r, i, vocab) for i in range(seq_len)]
                         for r in range(first_row, first_row + rows)], dtype=torch.long)


def reset_peak_memory():
    """Resets the resident high-water mark (VmHWM); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_resident_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def matmul_peak(dtype, repeats=10):
    """Best-of-repeats FLOP/s of a 1024 x 1024 x 1024 matmul."""
    a = torch.randn(1024, 1024).to(dtype)
    b = torch.randn(1024, 1024).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * 1024 ** 3 / best

# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def train(cfg, batch, seq_len, precision, steps, warmup, learning_rate):
    params = build(cfg)
    vocab = cfg["vocab_size"]
    optimizer = torch.optim.AdamW(distinct(params), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0)
    autocast = precision == "bf16"
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "other": 0.0}
    losses = []
    peak_reset = False
    start = mark = time.perf_counter()

    def charge(phase):
        nonlocal mark
        now = time.perf_counter()
        phases[phase] += now - mark
        mark = now

    for step in range(warmup + steps):
        if step == warmup:
            for phase in phases:
                phases[phase] = 0.0
            peak_reset = reset_peak_memory()
            start = mark = time.perf_counter()
        ids = synthetic_rows(step * batch, batch, seq_len, vocab)
        charge("other")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = forward(params, cfg, ids)  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
        charge("forward")
        loss.backward()
        charge("backward")
        torch.nn.utils.clip_grad_norm_(distinct(params), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        charge("optimizer")
        losses.append(loss.item())
        del logits, loss
        charge("other")
    seconds = time.perf_counter() - start
    tokens = batch * seq_len * steps
    return {
        "precision": precision,
        "steps": steps,
        "warmup": warmup,
        "tokens_per_second": tokens / seconds,
        "step_seconds": seconds / steps,
        "forward_seconds": phases["forward"] / steps,
        "backward_seconds": phases["backward"] / steps,
        "optimizer_seconds": phases["optimizer"] / steps,
        "other_seconds": phases["other"] / steps,
        "peak_resident_bytes": peak_resident_bytes() if peak_reset else None,
        "losses": losses,             # every step, the warm-up steps first
    }


def train_command(args):
    if args.model_config:
        with open(args.model_config, encoding="utf-8") as f:
            raw = json.load(f)
        batch, seq_len = args.batch, args.seq_len
        name = args.config or "custom"
    else:
        raw, batch, seq_len = PRESETS[args.config]
        batch, seq_len = args.batch or batch, args.seq_len or seq_len
        name = args.config
    cfg = complete_config(raw)
    torch.set_num_threads(args.threads)
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    per_token = flops_per_token(cfg, seq_len)
    runs = []
    for precision in precisions:
        print("pytorch: %s %s, %d + %d steps" % (name, precision, args.warmup, args.steps), file=sys.stderr)
        run = train(cfg, batch, seq_len, precision, args.steps, args.warmup, args.learning_rate)
        run["model_flops_per_second"] = per_token * run["tokens_per_second"]
        run["mfu_fp32_peak"] = run["model_flops_per_second"] / peaks["fp32"]
        run["mfu_bf16_peak"] = run["model_flops_per_second"] / peaks["bf16"]
        runs.append(run)
    layers, width, n = shape(cfg)
    json.dump({
        "implementation": "pytorch %s" % torch.__version__,
        "config": name,
        "model_type": family(cfg),
        "layers": layers,
        "width": width,
        "matmul_parameters": n,
        "batch": batch,
        "seq_len": seq_len,
        "threads": torch.get_num_threads(),
        "flops_per_token": per_token,
        "matmul_peak_fp32_flops": peaks["fp32"],
        "matmul_peak_bf16_flops": peaks["bf16"],
        "runs": runs,
    }, sys.stdout, indent=2)
    print()

# --------------------------------------------------------------------------
# Generation with a key/value cache (HF's generate loop: past_key_values grown by torch.cat)
# --------------------------------------------------------------------------


def gpt2_cached(p, cfg, ids, past):
    """ids (B, T_new); past: per layer (k, v) (B, H, T_past, hd) or None -> logits of the last
    position (B, V), new past."""
    B, T = ids.shape
    d, H = cfg["n_embd"], cfg["n_head"]
    hd = d // H
    eps = cfg["layer_norm_epsilon"]
    offset = 0 if past is None else past[0][0].shape[2]
    h = p["transformer.wte.weight"][ids] + p["transformer.wpe.weight"][torch.arange(offset, offset + T)][None]
    mask = torch.ones(T, offset + T, dtype=torch.bool).tril(diagonal=offset)
    present = []
    for i in range(cfg["n_layer"]):
        pre = "transformer.h.%d." % i
        x = F.layer_norm(h, (d,), p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], eps)
        q, k, v = (x @ p[pre + "attn.c_attn.weight"] + p[pre + "attn.c_attn.bias"]).split(d, dim=2)
        q, k, v = (t.view(B, T, H, hd).permute(0, 2, 1, 3) for t in (q, k, v))  # (B, H, T, hd)
        if past is not None:
            k = torch.cat((past[i][0], k), dim=2)
            v = torch.cat((past[i][1], v), dim=2)
        present.append((k, v))
        w = (q @ k.transpose(-1, -2)) / torch.full([], hd ** 0.5, dtype=q.dtype)
        w = torch.where(mask, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype)).softmax(dim=-1)
        a = (w @ v).permute(0, 2, 1, 3).reshape(B, T, d)
        h = h + a @ p[pre + "attn.c_proj.weight"] + p[pre + "attn.c_proj.bias"]
        x = F.layer_norm(h, (d,), p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], eps)
        m = make_golden.gelu_new(x @ p[pre + "mlp.c_fc.weight"] + p[pre + "mlp.c_fc.bias"])
        h = h + m @ p[pre + "mlp.c_proj.weight"] + p[pre + "mlp.c_proj.bias"]
    h = F.layer_norm(h[:, -1], (d,), p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    return h @ p["transformer.wte.weight"].t(), present


def llama_cached(p, cfg, ids, past):
    B, T = ids.shape
    H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    rep = H // KV
    eps = cfg["rms_norm_eps"]
    offset = 0 if past is None else past[0][0].shape[2]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.arange(offset, offset + T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().float()[None, None], emb.sin().float()[None, None]
    mask = torch.ones(T, offset + T, dtype=torch.bool).tril(diagonal=offset)
    h = p["model.embed_tokens.weight"][ids]
    present = []
    for i in range(cfg["num_hidden_layers"]):
        pre = "model.layers.%d." % i
        x = make_golden.rms_norm(h, p[pre + "input_layernorm.weight"], eps)
        q = (x @ p[pre + "self_attn.q_proj.weight"].t()).view(B, T, H, hd).transpose(1, 2)
        k = (x @ p[pre + "self_attn.k_proj.weight"].t()).view(B, T, KV, hd).transpose(1, 2)
        v = (x @ p[pre + "self_attn.v_proj.weight"].t()).view(B, T, KV, hd).transpose(1, 2)
        q = q * cos + make_golden.rotate_half(q) * sin
        k = k * cos + make_golden.rotate_half(k) * sin
        if past is not None:
            k = torch.cat((past[i][0], k), dim=2)
            v = torch.cat((past[i][1], v), dim=2)
        present.append((k, v))
        S = k.shape[2]
        kr = k[:, :, None].expand(B, KV, rep, S, hd).reshape(B, H, S, hd)
        vr = v[:, :, None].expand(B, KV, rep, S, hd).reshape(B, H, S, hd)
        w = (q @ kr.transpose(2, 3)) * hd ** -0.5
        w = torch.where(mask, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype)).softmax(dim=-1)
        a = (w @ vr).transpose(1, 2).reshape(B, T, H * hd)
        h = h + a @ p[pre + "self_attn.o_proj.weight"].t()
        x = make_golden.rms_norm(h, p[pre + "post_attention_layernorm.weight"], eps)
        g = F.silu(x @ p[pre + "mlp.gate_proj.weight"].t())
        h = h + (g * (x @ p[pre + "mlp.up_proj.weight"].t())) @ p[pre + "mlp.down_proj.weight"].t()
    h = make_golden.rms_norm(h[:, -1], p["model.norm.weight"], eps)
    return h @ p["lm_head.weight"].t(), present


def generate(params, cfg, new_tokens, use_cache):
    """Greedy generation of new_tokens tokens after the one-token prompt [0]: (seconds per token,
    the ids generated)."""
    cached = gpt2_cached if family(cfg) == "gpt2" else llama_cached
    ids = torch.zeros(1, 1, dtype=torch.long)
    past = None
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(new_tokens):
            if use_cache:
                logits, past = cached(params, cfg, ids[:, -1:] if past is not None else ids, past)
            else:
                logits = forward(params, cfg, ids)[:, -1]
            ids = torch.cat((ids, logits.argmax(dim=-1, keepdim=True)), dim=1)
    return (time.perf_counter() - start) / new_tokens, ids[0, 1:].tolist()


def generation_command(args):
    if args.model_config:
        with open(args.model_config, encoding="utf-8") as f:
            raw = json.load(f)
    else:
        raw = PRESETS[args.config][0]
    cfg = complete_config(raw)
    torch.set_num_threads(args.threads)
    params = {n: t.detach() for n, t in build(cfg).items()}
    lengths = [int(s) for s in args.lengths.split(",") if s.strip()]
    rows = []
    for n in [max(lengths)] + lengths:  # the first run, at the longest length, warms up (as ours)
        # The median of three runs of each mode, as ours (GenerationBenchmark.Repeats).
        cached_runs = [generate(params, cfg, n, True) for _ in range(3)]
        uncached_runs = [generate(params, cfg, n, False) for _ in range(3)]
        cached, cached_ids = sorted(cached_runs)[1]
        uncached, uncached_ids = sorted(uncached_runs)[1]
        if cached_ids != uncached_ids:
            raise SystemExit("bench_torch.py: the cached loop generated other tokens than the uncached one")
        rows.append({"new_tokens": n, "cached_seconds_per_token": cached, "uncached_seconds_per_token": uncached})
    rows = rows[1:]
    json.dump({"implementation": "pytorch %s" % torch.__version__, "threads": torch.get_num_threads(),
               "rows": rows}, sys.stdout, indent=2)
    print()


def print_data_command(args):
    json.dump(synthetic_rows(args.first_row, args.rows, args.seq_len, args.vocab).tolist(), sys.stdout)
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="training tokens/s, step split, MFU, peak memory")
    train_parser.add_argument("--config", choices=sorted(PRESETS), help="a preset (or the name to report with --model-config)")
    train_parser.add_argument("--model-config", help="an HF config.json (overrides the preset's model)")
    train_parser.add_argument("--batch", type=int, help="rows per step (the preset's by default)")
    train_parser.add_argument("--seq-len", type=int, help="tokens per row (the preset's by default)")
    train_parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    train_parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps")
    train_parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before measuring")
    train_parser.add_argument("--threads", type=int, default=2)
    train_parser.add_argument("--learning-rate", type=float, default=1e-3)
    generation_parser = commands.add_parser("generation", help="ms/token with and without the key/value cache")
    generation_parser.add_argument("--config", choices=sorted(PRESETS), default="llama")
    generation_parser.add_argument("--model-config", help="an HF config.json (overrides --config)")
    generation_parser.add_argument("--lengths", default="32,64,128,256")
    generation_parser.add_argument("--threads", type=int, default=2)
    data_parser = commands.add_parser("print-data", help="the synthetic rows as a JSON array")
    data_parser.add_argument("--first-row", type=int, default=0)
    data_parser.add_argument("--rows", type=int, default=2)
    data_parser.add_argument("--seq-len", type=int, default=8)
    data_parser.add_argument("--vocab", type=int, default=VOCAB)
    args = parser.parse_args()
    if args.command == "train":
        if args.model_config is None and args.config is None:
            parser.error("train needs --config or --model-config")
        if args.model_config is not None and (args.batch is None or args.seq_len is None):
            parser.error("--model-config needs --batch and --seq-len")
        train_command(args)
    elif args.command == "generation":
        generation_command(args)
    else:
        print_data_command(args)


if __name__ == "__main__":
    main()
