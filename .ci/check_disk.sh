#!/usr/bin/env bash
# Usage: check_disk.sh VENV_DIR NEED_GB — fail clearly when the disk is too small for the torch stack.
venv="$1"; need_gb="$2"
if [ -f "$venv/.installed" ]; then exit 0; fi
dir=$(dirname "$(readlink -f "$venv" 2>/dev/null || echo "$venv")")
avail_kb=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
avail_gb=$((avail_kb / 1024 / 1024))
if [ "$avail_gb" -lt "$need_gb" ]; then
  echo "error: only ${avail_gb} GB free on $(df -P "$dir" | awk 'NR==2 {print $6}'); installing the torch stack into $venv needs about ${need_gb} GB." >&2
  echo "Free some space (or set VENV=/path/on/a/bigger/disk) and run the command again." >&2
  exit 1
fi
echo "disk: ${avail_gb} GB free, enough for the install (${need_gb} GB)"
