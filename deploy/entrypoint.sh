#!/usr/bin/env bash
# tpserve-entrypoint, the image's entrypoint: when TPSERVE_MODEL_URL is set, fetches the model to
# $TPSERVE_MODEL first if it is absent (tpserve-fetch-model); then runs the command, e.g.
#   tpserve serve --model /models/model.gguf ...   or   tpserve-worker --rank 0 ...
# TPSERVE_MODEL is also what `tpserve serve` reads when --model is not given.
set -euo pipefail
if [ -n "${TPSERVE_MODEL_URL:-}" ]; then
  tpserve-fetch-model
fi
exec "$@"
