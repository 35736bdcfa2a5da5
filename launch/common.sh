# shellcheck shell=bash
# Shared helpers for the launch scripts (sourced, not run).
# DRY_RUN=1 prints every command instead of running it.

DRY_RUN="${DRY_RUN:-0}"

run() {
  # Prints the command (shell-quoted); runs it unless DRY_RUN=1.
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [ "$DRY_RUN" != "1" ]; then
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}
