#!/usr/bin/env python3
"""Reference for token-embedding resize with HF's mean_resizing rule (transformers'
_init_added_embeddings_weights_with_mean), written from its semantics:

    W (N, C) float32 old rows; m = mean over rows; S = (W - m)^T (W - m) / N;
    if 1e-9 S is positive definite: new rows ~ MultivariateNormal(m, covariance_matrix=1e-9 S).sample((k,))
    else: new rows = m.

The sample is drawn right after torch.manual_seed(SEED) from the global generator, as a script that
seeds and then calls resize_token_embeddings draws it. Writes tests/golden/resize-embeddings/resize.json.

Usage: /usr/bin/python3 tools/reference/make_resize_golden.py --out tests/golden
"""
import argparse
import json
import os

import torch

OLD_ROWS, WIDTH, ADDED, INIT_SEED, SEED = 40, 16, 5, 3, 11


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(INIT_SEED)
    old = (torch.randn(OLD_ROWS, WIDTH, generator=g) * 0.2).to(torch.float32)
    mean = old.mean(dim=0)
    centered = old - mean
    covariance = centered.T @ centered / OLD_ROWS
    scaled = 1e-9 * covariance
    assert bool(torch.distributions.constraints.positive_definite.check(scaled).all())
    torch.manual_seed(SEED)
    new = torch.distributions.MultivariateNormal(mean, covariance_matrix=scaled).sample((ADDED,))
    folder = os.path.join(args.out, "resize-embeddings")
    os.makedirs(folder, exist_ok=True)
    record = {
        "seed": SEED,
        "old": [[float(x) for x in row] for row in old.tolist()],
        "new_rows": [[float(x) for x in row] for row in new.tolist()],
        "torch": torch.__version__,
    }
    with open(os.path.join(folder, "resize.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
