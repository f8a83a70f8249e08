#!/bin/sh
# Runs once, on the first start of the compose PostgreSQL (docker-entrypoint-initdb.d):
# the audit database and its owner, and the gateway's upstream login role.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE ROLE pgguard_audit LOGIN PASSWORD '${PGGUARD_AUDIT_DB_PASSWORD}';
CREATE DATABASE pgguard_audit OWNER pgguard_audit;
SQL
