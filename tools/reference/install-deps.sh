#!/bin/sh
# Installs what tools/reference/make_golden.py needs on Debian 12 (bookworm):
# Debian's python3 (3.11) with PyTorch 1.13 (CPU) and the OpenBLAS backend; and what
# make_chat_template_jinja2.py needs: Jinja2 (the renderer of transformers' apply_chat_template).
set -eu
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends python3 python3-numpy python3-torch python3-jinja2 libopenblas0-pthread
/usr/bin/python3 -c "import torch, numpy, jinja2; print('torch', torch.__version__, 'numpy', numpy.__version__, 'jinja2', jinja2.__version__)"
