"""Golden learning rates of torch.optim.lr_scheduler.ReduceLROnPlateau on scripted metric sequences.

Writes tests/golden/schedules/plateau.json: for each case, the scheduler's settings, the metric sequence
fed to step() one value per evaluation, and the learning rate after each step. Functional's
Plateau state machine must reproduce these exactly (tests/Functional.Tests/PlateauTests.fs).

Run with Debian's PyTorch: /usr/bin/python3 tools/reference/make_plateau_golden.py
"""

import json
import math
import os
import random

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "..", "tests", "golden", "schedules", "plateau.json")


def run(settings, base_lr, metrics):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **settings)
    lrs = []
    for m in metrics:
        scheduler.step(m)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def walk(seed, n, start, drift, noise):
    rng = random.Random(seed)
    value, out = start, []
    for _ in range(n):
        value = value + drift + rng.uniform(-noise, noise)
        out.append(round(value, 6))
    return out


def main():
    plateau = [2.0, 1.5, 1.2, 1.2, 1.2, 1.19995, 1.3, 1.1, 1.1, 1.1, 1.1, 1.1, 1.0999, 1.2, 1.2, 1.2, 0.9]
    cases = [
        ("torch defaults", {}, 0.2, walk(1, 60, 3.0, -0.01, 0.05) + walk(2, 40, 2.4, 0.0, 0.01)),
        ("patience 2", {"patience": 2}, 1.0, plateau),
        ("patience 1, cooldown 2, factor 0.5", {"patience": 1, "cooldown": 2, "factor": 0.5}, 1.0, plateau + plateau[::-1]),
        ("absolute threshold", {"patience": 1, "threshold": 0.05, "threshold_mode": "abs"}, 1.0, plateau),
        ("max mode", {"mode": "max", "patience": 1, "factor": 0.3}, 0.5, [-m for m in plateau]),
        ("max mode, absolute threshold", {"mode": "max", "patience": 0, "threshold": 0.1, "threshold_mode": "abs"}, 0.5, [-m for m in plateau]),
        ("min_lr floor", {"patience": 0, "factor": 0.5, "min_lr": 0.1}, 1.0, [1.0] * 8),
        ("eps skips tiny reductions", {"patience": 0, "factor": 0.5, "eps": 0.3}, 1.0, [1.0] * 6),
        ("patience 0 on a rising loss", {"patience": 0}, 0.01, [float(i) for i in range(1, 10)]),
        ("long noisy walk", {"patience": 3, "cooldown": 1, "factor": 0.7}, 0.05, walk(7, 80, 2.0, 0.0, 0.1)),
    ]
    golden = []
    for name, settings, base_lr, metrics in cases:
        golden.append(
            {
                "name": name,
                "settings": settings,
                "base_lr": base_lr,
                "metrics": metrics,
                "lrs": run(settings, base_lr, metrics),
            }
        )
    with open(OUT, "w") as f:
        json.dump({"torch": torch.__version__, "cases": golden}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
