#!/usr/bin/env bash
# Creates or updates the Python venv holding OpenStack Glance from PyPI, for
# tests/glance (the interop suite) and benches/glance (the comparison):
#
#   bash tests/glance/setup.sh        # prints the venv's path on stdout
#
# IMGCACHE_GLANCE_VENV: where (default target/glance-venv, relative to the
# crate); IMGCACHE_GLANCE_VERSION: which Glance (default 33.0.0).
# Idempotent: nothing is installed when the venv already holds that Glance
# version, xattr and psycopg2-binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${IMGCACHE_GLANCE_VENV:-target/glance-venv}
version=${IMGCACHE_GLANCE_VERSION:-33.0.0}

installed() {
  [ -x "$venv/bin/python" ] || return 1
  # pip metadata, not an import: importing Glance takes a second.
  "$venv/bin/python" - "$version" <<'PY' 2>/dev/null
import sys
from importlib import metadata
want = {'glance': sys.argv[1], 'xattr': None, 'psycopg2-binary': None}
for name, version in want.items():
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if version is not None and have != version:
        sys.exit(1)
PY
}

if ! installed; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # xattr: the package Glance's xattr driver imports (not a dependency of
  # Glance); psycopg2-binary: the driver of Glance's PostgreSQL database
  # (centralized_db, glance-manage db_sync).
  "$venv/bin/pip" install -q "glance==$version" xattr psycopg2-binary >&2
  installed || { echo "setup.sh: $venv still lacks glance==$version, xattr or psycopg2-binary" >&2; exit 1; }
fi
echo "$venv"
