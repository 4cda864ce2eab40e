#!/bin/sh
# Installs Open MPI (Debian/Ubuntu: openmpi-bin + libopenmpi-dev) when `mpirun` is missing. The
# distributed runtime binds libmpi.so.40 at run time; the test list "mpi" launches `mpirun -np 2`.
set -eu
if command -v mpirun >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-mpi.sh: mpirun is missing and apt-get is not available; install Open MPI (mpirun and libmpi.so.40) with your system's package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends openmpi-bin libopenmpi-dev
