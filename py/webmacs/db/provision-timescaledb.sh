#!/usr/bin/env bash
# Make the timescaledb extension available to the PostgreSQL that pg_config names.
# Idempotent: exits in well under a second when the extension is already installed.
# On Debian/Ubuntu without a packaged timescaledb, builds the Apache-2 edition from Debian trixie's
# source package (about 20 s of compile on 2 cores). Elsewhere, says what to install and fails.
set -euo pipefail

PG_CONFIG=${PG_CONFIG:-$(command -v pg_config || true)}
if [ -z "$PG_CONFIG" ]; then
  for v in 17 16 15 14; do
    if [ -x "/usr/lib/postgresql/$v/bin/pg_config" ]; then PG_CONFIG=/usr/lib/postgresql/$v/bin/pg_config; break; fi
  done
fi
if [ -z "$PG_CONFIG" ] || [ ! -x "$PG_CONFIG" ]; then
  if [ -d /usr/lib/postgresql ]; then
    v=$(ls /usr/lib/postgresql | sort -n | tail -n1)
    PG_CONFIG=/usr/lib/postgresql/$v/bin/pg_config
  fi
fi

pg_major() { "$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/'; }

have_extension() {
  [ -x "$PG_CONFIG" ] || return 1
  local share pkglib
  share=$("$PG_CONFIG" --sharedir)
  pkglib=$("$PG_CONFIG" --pkglibdir)
  [ -f "$share/extension/timescaledb.control" ] && ls "$pkglib"/timescaledb*.so >/dev/null 2>&1
}

if have_extension; then
  echo "timescaledb: already installed for PostgreSQL $(pg_major)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  cat >&2 <<MSG
timescaledb: the extension is not installed for the PostgreSQL found by pg_config (${PG_CONFIG:-none}).
This script can only build it on Debian/Ubuntu. Install TimescaleDB for your PostgreSQL
(https://docs.timescale.com/self-hosted/latest/install/) or point DATABASE_URL at a server that has it.
MSG
  exit 1
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# Server headers, cmake and a compiler; the PostgreSQL server itself if absent.
if [ ! -x "${PG_CONFIG:-/nonexistent}" ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq postgresql postgresql-contrib >/dev/null
  v=$(ls /usr/lib/postgresql | sort -n | tail -n1)
  PG_CONFIG=/usr/lib/postgresql/$v/bin/pg_config
fi
PGV=$(pg_major)
need=()
dpkg -s "postgresql-server-dev-$PGV" >/dev/null 2>&1 || need+=("postgresql-server-dev-$PGV")
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v make >/dev/null 2>&1 || need+=(make)
dpkg -s dpkg-dev >/dev/null 2>&1 || need+=(dpkg-dev)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The server-dev package may bring a pg_config wrapper that points elsewhere; pin the versioned one.
PG_CONFIG=/usr/lib/postgresql/$PGV/bin/pg_config

work=${WEBMACS_BUILD_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/webmacs/timescaledb-build}
mkdir -p "$work/apt/lists/partial" "$work/apt/archives/partial" "$work/src"
cat > "$work/apt/sources.list" <<SRC
deb-src http://deb.debian.org/debian trixie main
SRC
APT_OPTS=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o "Dir::Etc::SourceParts=-"
          -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache::Archives=$work/apt/archives"
          -o "APT::Sandbox::User=root" -o "Acquire::Languages=none")
echo "timescaledb: fetching Debian trixie source package"
$SUDO apt-get "${APT_OPTS[@]}" update -qq
( cd "$work/src" && rm -rf timescaledb-* timescaledb_* && \
  $SUDO apt-get "${APT_OPTS[@]}" source --download-only -qq timescaledb && \
  dpkg-source --no-check -x timescaledb_*.dsc timescaledb-src >/dev/null )

echo "timescaledb: building the Apache-2 edition for PostgreSQL $PGV"
cd "$work/src/timescaledb-src"
./bootstrap -DAPACHE_ONLY=ON -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF \
  -DUSE_TELEMETRY=OFF -DPG_CONFIG="$PG_CONFIG" >/dev/null
make -C build -j"$(nproc)" >/dev/null
$SUDO make -C build install >/dev/null
have_extension && echo "timescaledb: installed for PostgreSQL $PGV"
