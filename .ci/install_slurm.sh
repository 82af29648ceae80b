#!/usr/bin/env bash
# Install Debian's Slurm (slurmctld, slurmd, client tools) and MUNGE for tests/test_slurm.py.
#
# Idempotent: does nothing when the binaries are already there. Never fails the CI run: if the
# packages cannot be installed (no root, no network, no apt), it says why on stderr and in
# $SLURM_INSTALL_LOG's last line, and the Slurm tests then skip with that reason instead of
# the whole suite going red for an infrastructure problem.
#
# Only the packages are installed: the test fixture (tests/slurm_cluster.py) writes its own
# slurm.conf and munge key in a temporary directory and starts/stops the daemons itself, so
# nothing here touches /etc/slurm or starts a service.
set -uo pipefail

LOG=${SLURM_INSTALL_LOG:-/tmp/megasft-slurm-install.log}
NEEDED=(sbatch srun scontrol squeue scancel sinfo slurmctld slurmd munged)

missing() {
  local out=()
  for b in "${NEEDED[@]}"; do
    command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || out+=("$b")
  done
  echo "${out[*]}"
}

# Client commands need a slurm.conf even for --version, so ask the package manager instead.
versions() { dpkg-query -W -f='${Package} ${Version}  ' slurm-wlm munge 2>/dev/null || echo "versions unknown"; }

give_up() {
  echo "install_slurm: $*; the Slurm tests will skip" | tee -a "$LOG" >&2
  exit 0
}

: >"$LOG"
if [[ -z "$(missing)" ]]; then
  echo "install_slurm: slurm and munge already installed ($(versions))" | tee -a "$LOG"
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || give_up "apt-get not found (not Debian/Ubuntu); missing: $(missing)"

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  # Non-interactive sudo only: a CI run must never hang on a password prompt.
  sudo -n true 2>/dev/null || give_up "not root and no passwordless sudo; missing: $(missing)"
  SUDO=(sudo -n)
fi

export DEBIAN_FRONTEND=noninteractive
# Package post-install scripts try to start slurmd/slurmctld/munge services; in a container there
# is no init system and we start our own daemons anyway. policy-rc.d exit 101 = "do not start".
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [[ ! -e $POLICY ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null && "${SUDO[@]}" chmod +x "$POLICY" && ADDED_POLICY=1
fi
cleanup() { [[ $ADDED_POLICY -eq 1 ]] && "${SUDO[@]}" rm -f "$POLICY"; }
trap cleanup EXIT

echo "install_slurm: installing slurm-wlm and munge (missing: $(missing))" | tee -a "$LOG"
# Retry once: apt mirrors hiccup, and a stale package list gives 404s until apt-get update.
ok=0
for attempt in 1 2; do
  if "${SUDO[@]}" apt-get update -q >>"$LOG" 2>&1 &&
     "${SUDO[@]}" apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$LOG" 2>&1; then
    ok=1; break
  fi
  echo "install_slurm: apt attempt $attempt failed; see $LOG" >&2
  sleep 5
done
[[ $ok -eq 1 ]] || give_up "apt-get install slurm-wlm munge failed: $(grep -E '^(E|W):' "$LOG" | tail -n1)"
[[ -z "$(missing)" ]] || give_up "installed, but still missing: $(missing)"
echo "install_slurm: ok ($(versions))" | tee -a "$LOG"
