# Shared helpers of the launch scripts (sourced, not run).
# DRY_RUN=1 prints every command (as you would type it) instead of running it.

# Prints one argument list as a shell command line, single-quoting words that need it.
show() {
  local out="" a
  for a in "$@"; do
    if [[ -z $a || $a =~ [^A-Za-z0-9_./:=,@%+-] ]]; then
      out+=" '${a//\'/\'\\\'\'}'"
    else
      out+=" $a"
    fi
  done
  echo "+${out}"
}

run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then show "$@"; else show "$@" >&2; "$@"; fi
}

# Runs a command in the background (prints it the same way); $! is its pid when not dry.
run_bg() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then echo "$(show "$@") &"; else echo "$(show "$@") &" >&2; "$@" & fi
}

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# The job's arguments as one shell-quoted string for a remote command line.
quote_args() { local out="" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "$out"; }

# A gzipped tarball of the checkout's tracked files (what gets installed on the workers).
source_tarball() {
  local repo out=$1
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  run git -C "$repo" archive --format=tar.gz -o "$out" HEAD
}
