#!/usr/bin/env bash
# Runs once, when the postgres container initialises an empty data volume (/docker-entrypoint-initdb.d): the
# official image creates $POSTGRES_DB (yolodex's metadata); this adds Label Studio's own database beside it.
set -euo pipefail
ls_database=${LS_POSTGRES_DB:-labelstudio}
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=name="$ls_database" --set=owner="$POSTGRES_USER" <<'SQL'
CREATE DATABASE :"name" OWNER :"owner";
SQL
