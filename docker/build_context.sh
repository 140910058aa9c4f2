#!/usr/bin/env bash
# Prepare the docker build context: fed_de's wheel and the exact pins of this environment.
# usage: docker/build_context.sh OUT_DIR   (then: docker build -f docker/Dockerfile OUT_DIR)
set -euo pipefail
out="${1:?usage: build_context.sh OUT_DIR}"
here="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
python -m pip wheel --no-deps -q -w "$out" "$here"
python - "$out/requirements.txt" <<'PY'
import sys
from fed_de.backends.substra import exact_pins
pins = exact_pins() + ["substrafl==1.0.0", "substra==1.0.0", "substratools==1.0.0"]
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("\n".join(pins))
PY
