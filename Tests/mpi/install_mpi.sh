#!/bin/sh
# Installs the optional MPI dependencies of ring attention: OpenMPI (apt) and mpi4py (pip).
# MPI is optional for everything else, so a failure prints one "MPI not installed: <reason>" line and exits 0.
set -u

not_installed() {
    echo "MPI not installed: $1"
    exit 0
}

if ! command -v mpirun >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || not_installed "mpirun is missing and apt-get is not available"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || not_installed "not root and sudo is not available"
        SUDO="sudo -n"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q >/dev/null || not_installed "apt-get update failed"
    $SUDO apt-get install -y -q --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null \
        || not_installed "apt-get install openmpi-bin libopenmpi-dev failed"
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import mpi4py" >/dev/null 2>&1; then
    # mpi4py builds against the OpenMPI just installed (mpicc must be on PATH).
    "$PYTHON" -m pip install -q mpi4py || not_installed "pip install mpi4py failed"
fi
echo "MPI ready: $(mpirun --version 2>/dev/null | head -n 1), mpi4py $("$PYTHON" -c 'import mpi4py; print(mpi4py.__version__)')"
