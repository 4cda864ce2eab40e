#!/usr/bin/env bash
# Two "hosts" on one machine for rehearsing multi-machine MPI runs (docs/distributed.md, "Several machines").
#
#   tools/two-hosts.sh up            creates them (idempotent) and prints the folder of the hostfile and agent
#   tools/two-hosts.sh run [-np N] [mpirun options] -- command...
#                                    runs mpirun across them (-np 2 by default: one rank per host)
#   tools/two-hosts.sh status        says whether they are up (exit 0) or not (exit 1)
#   tools/two-hosts.sh down          removes them (idempotent)
#
# Each host is a network namespace (fnl-host0: 10.231.0.1/24, fnl-host1: 10.231.0.2/24) joined by a veth
# pair; nothing else (files, processes, users) is separated, so every path is the same on both hosts, as on
# machines that share a filesystem. mpirun runs in fnl-host0 and starts Open MPI's daemon on each host
# through the agent script, which stands in for ssh (`agent [ssh options] HOST COMMAND...`): it enters the
# host's namespace with a login-like environment, so whatever the ranks need from the launching environment
# must be passed with -x, as on real machines. Open MPI's TCP transport is bound to the hosts' subnet.
#
# The folder (hostfile, agent) is $FUNCTIONAL_HOSTS_DIR, /tmp/functional-hosts by default.
# Exit codes: 0 done; 1 failed or bad usage; 3 cannot run on this machine (not root, no iproute2, network
# namespaces not permitted, no mpirun), with a message saying why, so that tests can skip.
set -euo pipefail

readonly HOSTS=(fnl-host0 fnl-host1)
readonly LINKS=(fnl-veth0 fnl-veth1)
readonly ADDRESSES=(10.231.0.1 10.231.0.2)
readonly SUBNET=10.231.0.0/24
readonly DIR="${FUNCTIONAL_HOSTS_DIR:-/tmp/functional-hosts}"
readonly SELF="tools/two-hosts.sh"

die() { echo "two-hosts: $*" >&2; exit 1; }
unavailable() { echo "two-hosts: unavailable here: $*" >&2; exit 3; }

usage() {
    cat >&2 <<EOF
usage: $SELF up | status | down
       $SELF run [-np N] [mpirun options] -- command...
EOF
    exit 1
}

require_namespaces() {
    if [ "$(id -u)" -ne 0 ]; then
        unavailable "needs root, for network namespaces (run: sudo $SELF ${1:-up})"
    fi
    if ! command -v ip >/dev/null 2>&1; then
        unavailable "needs ip from iproute2 (apt-get install iproute2; .ci/run installs it)"
    fi
}

# Serializes up and down (two test runs may bring the hosts up at the same time).
lock() {
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    if command -v flock >/dev/null 2>&1; then flock 9; fi
}

namespace_exists() { [ -e "/run/netns/$1" ]; }

is_up() {
    local i addresses flags
    [ -x "$DIR/agent" ] && [ -f "$DIR/hostfile" ] || return 1
    for i in 0 1; do
        namespace_exists "${HOSTS[$i]}" || return 1
        # Read whole (grep -q closing the pipe early would fail the pipeline under pipefail).
        addresses=$(ip -n "${HOSTS[$i]}" -o addr show dev "${LINKS[$i]}" 2>/dev/null) || return 1
        flags=$(ip -n "${HOSTS[$i]}" -o link show dev "${LINKS[$i]}" 2>/dev/null) || return 1
        [[ "$addresses" == *"inet ${ADDRESSES[$i]}/"* ]] || return 1
        [[ "$flags" =~ [\<,]UP[,\>] ]] || return 1
    done
}

write_files() {
    printf '%s slots=1\n' "${HOSTS[@]}" >"$DIR/hostfile"
    # The agent: mpirun calls it as it would call ssh. It keeps only what a login on another machine would
    # have (PATH is kept: it is the same machine, and dotnet may live outside the system PATH).
    cat >"$DIR/agent.tmp" <<'EOF'
#!/bin/sh
# Written by tools/two-hosts.sh: Open MPI's plm_rsh_agent for the two-namespace hosts (stands in for ssh).
while [ $# -gt 0 ]; do
    case "$1" in
        -[bcDEeFIiLlmOoPpQRSWw]) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
if [ $# -lt 2 ]; then echo "two-hosts agent: usage: agent [ssh options] HOST COMMAND..." >&2; exit 255; fi
host=$1
shift
case "$host" in
    fnl-host0|fnl-host1) ;;
    *) echo "two-hosts agent: unknown host '$host' (known: fnl-host0 fnl-host1)" >&2; exit 255 ;;
esac
# Each host keeps Open MPI's session files in a /tmp of its own, as separate machines do: the hosts share
# this machine's /tmp and host name, and a daemon meeting another run's leftover session folder of the same
# name (job numbers come back) stops at startup.
tmp="$(cd "$(dirname "$0")" && pwd)/tmp/$host"
mkdir -p "$tmp"
exec ip netns exec "$host" env -i PATH="$PATH" HOME="${HOME:-/root}" USER="${USER:-root}" LOGNAME="${LOGNAME:-root}" SHELL=/bin/sh LANG="${LANG:-C.UTF-8}" OMPI_MCA_orte_tmpdir_base="$tmp" /bin/sh -c "$*"
EOF
    chmod +x "$DIR/agent.tmp"
    mv -f "$DIR/agent.tmp" "$DIR/agent"
}

up() {
    require_namespaces up
    lock
    local i error
    for i in 0 1; do
        if ! namespace_exists "${HOSTS[$i]}"; then
            if ! error=$(ip netns add "${HOSTS[$i]}" 2>&1); then
                unavailable "network namespaces are not permitted (ip netns add ${HOSTS[$i]}: ${error}); an unprivileged container cannot make them"
            fi
        fi
    done
    if ! ip -n "${HOSTS[0]}" link show dev "${LINKS[0]}" >/dev/null 2>&1; then
        # A lone end left in the other namespace would block the pair's creation.
        ip -n "${HOSTS[1]}" link del dev "${LINKS[1]}" >/dev/null 2>&1 || true
        error=$(ip link add "${LINKS[0]}" netns "${HOSTS[0]}" type veth peer name "${LINKS[1]}" netns "${HOSTS[1]}" 2>&1) \
            || unavailable "cannot create a veth pair (ip link add ... type veth: ${error})"
    fi
    for i in 0 1; do
        ip -n "${HOSTS[$i]}" link set dev lo up
        ip -n "${HOSTS[$i]}" addr replace "${ADDRESSES[$i]}/24" dev "${LINKS[$i]}"
        ip -n "${HOSTS[$i]}" link set dev "${LINKS[$i]}" up
    done
    write_files
    is_up || die "the hosts did not come up (see: ip -n ${HOSTS[0]} addr; ip -n ${HOSTS[1]} addr)"
    echo "$DIR"
}

down() {
    require_namespaces down
    lock
    local host
    for host in "${HOSTS[@]}"; do
        if namespace_exists "$host"; then
            # What still runs on the host (a daemon of a run whose link went down) is ended first: a deleted
            # namespace lives on while a process holds it, and mpirun's daemons would outlive the hosts.
            local pids
            pids=$(ip netns pids "$host" 2>/dev/null || true)
            if [ -n "$pids" ]; then
                kill -9 $pids 2>/dev/null || true
                sleep 0.2
            fi
            ip netns del "$host" || die "cannot remove the namespace $host (ip netns pids $host lists what still runs there)"
        fi
    done
    rm -f "$DIR/hostfile" "$DIR/agent" "$DIR/agent.tmp"
    rm -rf "$DIR/tmp"
}

status() {
    if is_up; then
        echo "up: ${HOSTS[0]} ${ADDRESSES[0]}, ${HOSTS[1]} ${ADDRESSES[1]} (hostfile and agent in $DIR)"
    else
        echo "down (bring them up with: $SELF up)"
        exit 1
    fi
}

run() {
    local processes=2
    local options=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do
        case "$1" in
            -np|-n) [ $# -ge 2 ] || usage; processes=$2; shift 2 ;;
            *) options+=("$1"); shift ;;
        esac
    done
    [ $# -ge 2 ] || usage
    shift
    case "$processes" in ''|*[!0-9]*|0) die "-np takes a process count of at least 1, not '$processes'" ;; esac
    require_namespaces run
    command -v mpirun >/dev/null 2>&1 \
        || unavailable "needs mpirun (Open MPI): sh tools/install-mpi.sh, or apt-get install openmpi-bin libopenmpi-dev"
    is_up || die "the hosts are not up: run '$SELF up' first"
    # What dotnet needs on the hosts; the agent passes nothing else from here (see above).
    local forward=(-x PATH)
    local name
    for name in DOTNET_ROOT DOTNET_CLI_HOME DOTNET_CLI_TELEMETRY_OPTOUT DOTNET_NOLOGO NUGET_PACKAGES LD_LIBRARY_PATH OMP_NUM_THREADS; do
        if [ -n "${!name:-}" ]; then forward+=(-x "$name"); fi
    done
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TERM=dumb \
        exec ip netns exec "${HOSTS[0]}" mpirun -np "$processes" \
        --hostfile "$DIR/hostfile" --map-by node --oversubscribe \
        --mca plm_rsh_agent "$DIR/agent" --mca plm_rsh_no_tree_spawn 1 \
        --mca pml ob1 --mca btl tcp,self --mca rtc_hwloc_vmhole none --mca orte_leave_session_attached 1 \
        --mca btl_tcp_if_include "$SUBNET" --mca oob_tcp_if_include "$SUBNET" \
        -x TERM \
        "${forward[@]}" "${options[@]}" "$@"
}

[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
    up) [ $# -eq 0 ] || usage; up ;;
    down) [ $# -eq 0 ] || usage; down ;;
    status) [ $# -eq 0 ] || usage; status ;;
    run) run "$@" ;;
    *) usage ;;
esac
