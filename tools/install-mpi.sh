#!/bin/sh
# Installs what the distributed tests need when it is missing (Debian/Ubuntu): Open MPI (openmpi-bin +
# libopenmpi-dev) when `mpirun` is missing, iproute2 when `ip` is missing. The distributed runtime binds
# libmpi.so.40 at run time; the test list "mpi" launches `mpirun -np 2`; tools/two-hosts.sh (the test list
# "two hosts") makes its two hosts with `ip netns`.
set -eu
PACKAGES=""
MISSING=""
if ! command -v mpirun >/dev/null 2>&1; then
    PACKAGES="openmpi-bin libopenmpi-dev"
    MISSING="Open MPI (mpirun and libmpi.so.40)"
fi
if ! command -v ip >/dev/null 2>&1; then
    PACKAGES="$PACKAGES iproute2"
    MISSING="${MISSING:+$MISSING and }iproute2 (ip)"
fi
if [ -z "$PACKAGES" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-mpi.sh: $MISSING missing and apt-get is not available; install with your system's package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
# shellcheck disable=SC2086 # the list splits into package names
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $PACKAGES
