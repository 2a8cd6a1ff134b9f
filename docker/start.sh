#!/usr/bin/env bash
# Starts one yolodex process in the foreground: a container's main process (docker/compose.yaml), or the same
# command outside Docker (tests/test_containers.py runs it so).
#
#   docker/start.sh app                 migrations + the starter project (`yolodex dataset starter`), then the app
#   docker/start.sh worker              the job worker (huey consumer, one process; scale with more containers)
#   docker/start.sh labelstudio         Label Studio in the foreground (`yolodex labelstudio start --foreground`)
#   docker/start.sh starter             migrations + the starter project, then exit (compose runs it once)
#   docker/start.sh health ROLE         exit 0 when ROLE (app, worker, labelstudio) answers: the health checks
#   docker/start.sh yolodex ARGS...     any `yolodex` command (e.g. `docker compose run --rm app yolodex jobs`)
#
# Environment: the YOLODEX_* settings (backend/settings.py), and
#   YOLODEX_SOURCE   the checkout (app/, pages/, backend/) [the folder above docker/]
#   YOLODEX_VENV     the app venv [<checkout>/.venv]
#   YOLODEX_LS_VENV  Label Studio's venv [<checkout>/.venv-labelstudio]
#   YOLODEX_APP_STARTER  0: the app skips the starter step (compose's `starter` service already ran it) [1]
set -euo pipefail

usage="usage: docker/start.sh app|worker|labelstudio|starter|health ROLE|yolodex ARGS..."
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
role=$1
shift
source_dir=${YOLODEX_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
venv=${YOLODEX_VENV:-$source_dir/.venv}
ls_venv=${YOLODEX_LS_VENV:-$source_dir/.venv-labelstudio}
export YOLODEX_LS_VENV=$ls_venv
host=${YOLODEX_HOST:-127.0.0.1}
app_port=${YOLODEX_APP_PORT:-8501}
ls_port=${YOLODEX_LS_PORT:-8080}
cd "$source_dir"

starter() {
    # Brings the database to the newest schema and creates the starter project once (a no-op afterwards).
    "$venv/bin/yolodex" dataset starter
}

# GET url; exit 0 when it answers 200 with a body containing `expected`. Python's stdlib: no curl in slim images.
probe() {
    local python=$1 url=$2 expected=$3
    "$python" - "$url" "$expected" <<'PY'
import sys
import urllib.request

url, expected = sys.argv[1], sys.argv[2]
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        body = response.read(4096).decode("utf-8", "replace")
except OSError as error:
    sys.exit(f"health: {url}: {error}")
if response.status != 200 or expected not in body:
    sys.exit(f"health: {url} answered {response.status} {body[:200]!r}")
PY
}

health() {
    # Probes 127.0.0.1: a server bound to 0.0.0.0 answers there too.
    local what=${1:-}
    case "$what" in
        app) probe "$venv/bin/python" "http://127.0.0.1:$app_port/_stcore/health" ok ;;
        labelstudio) probe "$ls_venv/bin/python" "http://127.0.0.1:$ls_port/health" UP ;;
        worker)
            # The consumer process is the container's main process (Docker sees it exit); this checks that the queue
            # it consumes from (Redis or the SQLite file) answers.
            "$venv/bin/python" - <<'PY'
import sys

from backend.jobs.tasks import huey

try:
    huey.storage.queue_size()
except Exception as error:  # Redis down, the SQLite file unreadable: one line, not a traceback
    sys.exit(f"health: the job queue does not answer: {type(error).__name__}: {error}")
PY
            ;;
        *) echo "usage: docker/start.sh health app|worker|labelstudio" >&2; exit 2 ;;
    esac
}

case "$role" in
    app)
        if [ "${YOLODEX_APP_STARTER:-1}" != 0 ]; then starter; fi
        exec "$venv/bin/streamlit" run app/main.py --server.address "$host" --server.port "$app_port" \
            --server.headless true --browser.gatherUsageStats false
        ;;
    worker)
        exec "$venv/bin/huey_consumer" backend.jobs.tasks.huey -k process -w 1 -m 1
        ;;
    labelstudio)
        # backend.labeling.server needs only the standard library, so Label Studio's own interpreter runs it: the
        # Label Studio image carries no torch. The same entry point as `yolodex labelstudio start --foreground`.
        export PYTHONPATH=$source_dir
        exec "$ls_venv/bin/python" -m backend.labeling.server start --foreground
        ;;
    starter) starter ;;
    health) health "$@" ;;
    yolodex) exec "$venv/bin/yolodex" "$@" ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
