#!/usr/bin/env bash
# Installs what tests/test_launch_paths.py needs (idempotent): Debian's OpenSSH server and client
# and pdsh (DeepSpeed's default multi-node runner), and Slurm (slurmctld, slurmd, client commands)
# with munge. Nothing is started or enabled here: the test runs its own throwaway sshd, munged,
# slurmctld and slurmd on loopback, with generated keys and configs, and stops them afterwards.
# Needs root (or sudo) for apt-get.
set -euo pipefail
need=()
for cmd in /usr/sbin/sshd:openssh-server /usr/bin/ssh:openssh-client /usr/bin/pdsh:pdsh \
           /usr/sbin/munged:munge /usr/sbin/slurmctld:slurmctld /usr/sbin/slurmd:slurmd \
           /usr/bin/sbatch:slurm-client; do
  if [ ! -x "${cmd%%:*}" ]; then need+=("${cmd##*:}"); fi
done
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${need[@]}"
fi
/usr/sbin/sshd -V 2>&1 | head -n1
pdsh -V 2>&1 | head -n1
dpkg-query -W -f '${Package} ${Version}\n' slurmctld slurmd slurm-client munge
