#!/usr/bin/env bash
# checkov in its own virtual environment, .venv/checkov (inside the project's ignored .venv/):
# its pins conflict with constraints.txt (see requirements.txt), so it cannot share .venv.
# Idempotent: does nothing when the installed set matches requirements.txt.
# Usage: deploy/checkov/install.sh [PYTHON]   (CHECKOV_VENV=DIR to install elsewhere)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${CHECKOV_VENV:-$root/.venv/checkov}"
python="${1:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [[ -x "$venv/bin/checkov" && -f "$venv/.installed" && "$(cat "$venv/.installed")" == "$want" ]]; then
  exit 0
fi
echo "checkov: installing the pinned set into $venv" >&2
test -x "$venv/bin/python" || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
"$venv/bin/pip" check >&2
echo "$want" > "$venv/.installed"
