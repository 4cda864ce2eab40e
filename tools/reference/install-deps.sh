#!/bin/sh
# Installs what tools/reference/make_golden.py needs on Debian 12 (bookworm):
# Debian's python3 (3.11) with PyTorch 1.13 (CPU) and the OpenBLAS backend.
set -eu
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends python3 python3-numpy python3-torch libopenblas0-pthread
/usr/bin/python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)"
