#!/usr/bin/python3
"""Generate tests/golden/optimizers/optimizers.json: per-step parameters of optimizers.

No model is involved: two small float32 parameters (a [3, 4] matrix and a [5] vector)
receive a fixed sequence of gradients (seeded normal draws, shrinking with the step so that
AMSGrad's running maximum differs from the plain second moment), and the script records the
parameters after every optimizer step.

torch.optim.AdamW (amsgrad, maximize), torch.optim.SGD (momentum with dampening) and
torch.optim.RMSprop come from torch 1.13 itself.  Lion and Adafactor are not part of
torch 1.13: their updates are written below with torch ops from the published algorithms
(Lion: Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2, as
lucidrains/lion-pytorch and HF's optim="lion_32bit" use it; Adafactor: Shazeer & Stern 2018
with the fairseq / Hugging Face transformers conventions: eps (1e-30, 1e-3), decay rate -0.8,
clip threshold 1, factored second moments for tensors of two or more dimensions, the
relative step size min(1e-2, 1 / sqrt(step)) and parameter scale max(eps2, RMS(p)) when
enabled, weight decay p -= wd * lr * p).

Usage:  /usr/bin/python3 tools/reference/make_optimizer_golden.py --out tests/golden/optimizers
Deterministic (one thread, fixed seed): running it twice gives byte-identical files.
"""

import argparse
import json
import math
import os

import torch

SHAPES = [[3, 4], [5]]
STEPS = 6


def initial_parameters():
    g = torch.Generator().manual_seed(1234)
    return [torch.randn(shape, generator=g, dtype=torch.float32) for shape in SHAPES]


def gradient_sequence():
    g = torch.Generator().manual_seed(5678)
    steps = []
    for k in range(STEPS):
        scale = 2.0 ** (-k)
        steps.append([torch.randn(shape, generator=g, dtype=torch.float32) * scale for shape in SHAPES])
    return steps


def run_torch(make, grads):
    params = [p.clone().requires_grad_(True) for p in initial_parameters()]
    opt = make(params)
    history = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history


def lion_reference(lr, beta1, beta2, weight_decay, grads):
    """Lion: c = b1 m + (1 - b1) g; p = p (1 - lr wd) - lr sign(c); m = b2 m + (1 - b2) g."""
    params = initial_parameters()
    moments = [torch.zeros_like(p) for p in params]
    history = []
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            p, m = params[i], moments[i]
            c = m * beta1 + g * (1.0 - beta1)
            p = p * (1.0 - lr * weight_decay) - lr * torch.sign(c)
            m = m * beta2 + g * (1.0 - beta2)
            params[i], moments[i] = p, m
        history.append([p.clone() for p in params])
    return history


def rms(t):
    return t.norm(2) / math.sqrt(t.numel())


def adafactor_reference(lr, weight_decay, relative_step, scale_parameter, grads,
                        eps=(1e-30, 1e-3), decay_rate=-0.8, clip_threshold=1.0):
    """Adafactor without first moment (beta1 None), as transformers.optimization.Adafactor."""
    params = initial_parameters()
    state = []
    for p in params:
        if p.dim() >= 2:
            state.append({"row": torch.zeros(p.shape[:-1]), "col": torch.zeros(p.shape[:-2] + p.shape[-1:])})
        else:
            state.append({"sq": torch.zeros_like(p)})
    history = []
    for k, step_grads in enumerate(grads):
        step = k + 1
        for i, g in enumerate(step_grads):
            p, s = params[i], state[i]
            step_size = lr
            if relative_step:
                step_size = min(1e-2, 1.0 / math.sqrt(step))
            scale = max(eps[1], float(rms(p))) if scale_parameter else 1.0
            alpha = scale * step_size
            beta2t = 1.0 - math.pow(step, decay_rate)
            sq = g * g + eps[0]
            if p.dim() >= 2:
                s["row"] = s["row"] * beta2t + sq.mean(dim=-1) * (1.0 - beta2t)
                s["col"] = s["col"] * beta2t + sq.mean(dim=-2) * (1.0 - beta2t)
                r = (s["row"] / s["row"].mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
                c = s["col"].unsqueeze(-2).rsqrt()
                u = r * c * g
            else:
                s["sq"] = s["sq"] * beta2t + sq * (1.0 - beta2t)
                u = s["sq"].rsqrt() * g
            u = u / torch.clamp(rms(u) / clip_threshold, min=1.0)
            u = u * alpha
            if weight_decay != 0.0:
                p = p - p * (weight_decay * alpha)
            params[i] = p - u
        history.append([p.clone() for p in params])
    return history


def to_lists(tensors):
    return [[float(x) for x in t.reshape(-1).tolist()] for t in tensors]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    grads = gradient_sequence()
    lr, wd = 0.01, 0.1
    cases = [
        # beta2 0.9: the second moment follows the shrinking gradients closely, so its running maximum
        # (AMSGrad) differs clearly from it.
        ("adamw_amsgrad", {"lr": lr, "betas": [0.9, 0.9], "eps": 1e-8, "weight_decay": wd, "amsgrad": True},
         lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.9), eps=1e-8, weight_decay=wd, amsgrad=True)),
        ("adamw_maximize", {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": wd, "maximize": True},
         lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, maximize=True)),
        ("sgd_dampening", {"lr": lr, "momentum": 0.9, "dampening": 0.5, "weight_decay": wd},
         lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9, dampening=0.5, weight_decay=wd)),
        ("rmsprop", {"lr": lr, "alpha": 0.99, "eps": 1e-8, "momentum": 0.0, "centered": False, "weight_decay": wd},
         lambda ps: torch.optim.RMSprop(ps, lr=lr, alpha=0.99, eps=1e-8, weight_decay=wd)),
        ("rmsprop_centered_momentum",
         {"lr": lr, "alpha": 0.99, "eps": 1e-8, "momentum": 0.9, "centered": True, "weight_decay": wd},
         lambda ps: torch.optim.RMSprop(ps, lr=lr, alpha=0.99, eps=1e-8, weight_decay=wd, momentum=0.9, centered=True)),
        # --optim rmsprop --optim-args "alpha=0.9,eps=1e-6,centered=True"
        ("rmsprop_alpha_eps_centered",
         {"lr": lr, "alpha": 0.9, "eps": 1e-6, "momentum": 0.0, "centered": True, "weight_decay": wd},
         lambda ps: torch.optim.RMSprop(ps, lr=lr, alpha=0.9, eps=1e-6, weight_decay=wd, centered=True)),
    ]
    results = []
    for name, settings, make in cases:
        results.append({"name": name, "source": "torch.optim " + torch.__version__, "settings": settings,
                        "steps": [to_lists(h) for h in run_torch(make, grads)]})
    results.append({"name": "lion", "source": "reference update written in this script",
                    "settings": {"lr": lr, "betas": [0.9, 0.99], "weight_decay": wd},
                    "steps": [to_lists(h) for h in lion_reference(lr, 0.9, 0.99, wd, grads)]})
    results.append({"name": "adafactor", "source": "reference update written in this script",
                    "settings": {"lr": lr, "weight_decay": wd, "relative_step": False, "scale_parameter": False},
                    "steps": [to_lists(h) for h in adafactor_reference(lr, wd, False, False, grads)]})
    results.append({"name": "adafactor_relative", "source": "reference update written in this script",
                    "settings": {"lr": None, "weight_decay": wd, "relative_step": True, "scale_parameter": True},
                    "steps": [to_lists(h) for h in adafactor_reference(None, wd, True, True, grads)]})
    # --optim adafactor --optim-args "clip_threshold=0.5,decay_rate=-0.6,scale_parameter=True"
    results.append({"name": "adafactor_clip_decay_scaled", "source": "reference update written in this script",
                    "settings": {"lr": lr, "weight_decay": wd, "relative_step": False, "scale_parameter": True,
                                 "clip_threshold": 0.5, "decay_rate": -0.6},
                    "steps": [to_lists(h) for h in adafactor_reference(lr, wd, False, True, grads,
                                                                       decay_rate=-0.6, clip_threshold=0.5)]})
    document = {
        "generator": "tools/reference/make_optimizer_golden.py",
        "torch": torch.__version__,
        "shapes": SHAPES,
        "initial": to_lists(initial_parameters()),
        "gradients": [to_lists(g) for g in grads],
        "cases": results,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "optimizers.json")
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    print("wrote", path, "with", len(results), "cases of", STEPS, "steps")


if __name__ == "__main__":
    main()
