#!/usr/bin/env bash
# Apply this project's patch set to an installed OpenRLHF (see patches/README.md).
#
# Usage:
#   bash scripts/apply_patches.sh [VENV_DIR]            apply to VENV_DIR's openrlhf (default: .venv)
#   bash scripts/apply_patches.sh --site-packages DIR   apply to the openrlhf package in DIR
#   add --check   to only report (exit 0: applied, 1: not applied)
#   add --revert  to restore the pristine upstream files
#
# Idempotent: an already-applied patch is detected (`patch --dry-run -R`) and left alone.
# A copy of the applied patch is kept in openrlhf-<version>.dist-info/TSDKD_CPU_PATCH, so a
# newer version of the patch replaces an older one (the old one is reversed first). Files the
# patch creates are added to the dist-info RECORD, so `pip uninstall openrlhf` removes them.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PATCH_FILE="$ROOT/patches/openrlhf-0.11.2-cpu.patch"
UPSTREAM_VERSION="0.11.2"
APPLIED_COPY_NAME="TSDKD_CPU_PATCH"

die() { echo "apply_patches.sh: $*" >&2; exit 2; }
say() { echo "apply_patches.sh: $*"; }

mode="apply"
site=""
venv=""
while [ $# -gt 0 ]; do
  case "$1" in
    --check) mode="check" ;;
    --revert) mode="revert" ;;
    --site-packages) [ $# -ge 2 ] || die "--site-packages needs a directory."; site="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    -*) die "unknown option '$1' (see --help)." ;;
    *) venv="$1" ;;
  esac
  shift
done

[ -f "$PATCH_FILE" ] || die "patch file $PATCH_FILE is missing."
command -v patch >/dev/null || die "the 'patch' tool is not installed (e.g. apt-get install patch)."

if [ -z "$site" ]; then
  venv="${venv:-$ROOT/.venv}"
  [ -x "$venv/bin/python" ] || die "no Python at $venv/bin/python; pass the virtualenv directory or --site-packages DIR."
  # find_spec does not execute openrlhf/__init__.py, so a broken half-patched tree is still found.
  find_site='import importlib.util, os; spec = importlib.util.find_spec("openrlhf"); print(os.path.dirname(os.path.dirname(spec.origin)))'
  site=$("$venv/bin/python" -c "$find_site" 2>/dev/null) \
    || die "openrlhf is not installed in $venv; install it first (scripts/setup_cpu.sh)."
fi
[ -d "$site/openrlhf" ] || die "no openrlhf package in $site."

# The patch targets one upstream release; refuse others rather than half-apply.
dist_info=$(ls -d "$site"/openrlhf-*.dist-info 2>/dev/null | head -n1 || true)
if [ -n "$dist_info" ]; then
  installed_version=$(basename "$dist_info" .dist-info)
  installed_version=${installed_version#openrlhf-}
  [ "$installed_version" = "$UPSTREAM_VERSION" ] \
    || die "$(basename "$PATCH_FILE") is for openrlhf $UPSTREAM_VERSION but $site has $installed_version; port the patch first (checklist in patches/README.md)."
fi
applied_copy="${dist_info:+$dist_info/$APPLIED_COPY_NAME}"

# -f: never guess (without it, patch silently applies a "reversed-looking" patch the other way);
# -E: reverting removes the files the patch created; --fuzz=0: the patch is for one exact
# release; no .orig/.rej files are left in site-packages.
run_patch() {
  local file="$1"
  shift
  patch -p1 -d "$site" -f -E --fuzz=0 --no-backup-if-mismatch --reject-file=- "$@" < "$file"
}
quietly() { "$@" >/dev/null 2>&1; }
is_applied() { quietly run_patch "$PATCH_FILE" -R --dry-run; }
applies_forward() { quietly run_patch "$PATCH_FILE" --dry-run; }

# Files the patch creates (hunk "@@ -0,0 ..."), as paths relative to site-packages.
created_files() {
  awk '/^\+\+\+ /{path=$2} /^@@ -0,0 /{sub(/^[^\/]*\//, "", path); print path}' "$PATCH_FILE" | sort -u
}

remember_applied_patch() {
  [ -n "$dist_info" ] || return 0
  cp "$PATCH_FILE" "$applied_copy"
  [ -f "$dist_info/RECORD" ] || return 0
  local rel
  for rel in $(created_files) "$(basename "$dist_info")/$APPLIED_COPY_NAME"; do
    grep -qxF "$rel,," "$dist_info/RECORD" || echo "$rel,," >> "$dist_info/RECORD"
  done
}

case "$mode" in
  check)
    if is_applied; then say "applied in $site."; exit 0; fi
    say "not applied in $site."
    exit 1
    ;;
  revert)
    if is_applied; then
      run_patch "$PATCH_FILE" -R --silent
      if [ -n "$applied_copy" ]; then rm -f "$applied_copy"; fi
      say "reverted; $site/openrlhf is upstream $UPSTREAM_VERSION again."
    else
      say "not applied in $site; nothing to revert."
    fi
    exit 0
    ;;
esac

if is_applied; then
  remember_applied_patch
  say "already applied in $site."
  exit 0
fi

# An older version of this patch may be applied: take it out first.
if [ -n "$applied_copy" ] && [ -f "$applied_copy" ] && quietly run_patch "$applied_copy" -R --dry-run; then
  run_patch "$applied_copy" -R --silent
  rm -f "$applied_copy"
  say "reverted the previously applied version of the patch."
fi

if ! applies_forward; then
  run_patch "$PATCH_FILE" --dry-run >&2 || true
  die "$(basename "$PATCH_FILE") does not apply to $site/openrlhf (modified by hand, or not openrlhf $UPSTREAM_VERSION); reinstall it with 'pip install --force-reinstall --no-deps openrlhf==$UPSTREAM_VERSION' and rerun."
fi
run_patch "$PATCH_FILE" --silent
remember_applied_patch
say "applied $(basename "$PATCH_FILE") to $site/openrlhf."
