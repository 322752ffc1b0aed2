# Sourced by scripts/run and scripts/test: a virtual environment with the pinned requirements.
# Usage: source scripts/venv.sh requirements.txt
find_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 "$HOME"/.pyenv/versions/3.13*/bin/python3 "$HOME"/.pyenv/versions/3.12*/bin/python3 /usr/local/bin/python3.12 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}

requirements="${1:-requirements.txt}"
if [ ! -x .venv/bin/python ]; then
  python=$(find_python) || { echo "Python 3.12 or newer is needed (Django 6 requires it); set PYTHON=/path/to/python3.12" >&2; exit 1; }
  echo "Creating .venv with $python"
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements*.txt | sha256sum | cut -c1-16)-$(basename "$requirements")"
if [ ! -f "$stamp" ]; then
  echo "Installing $requirements (first run takes a few minutes)…"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r "$requirements"
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
