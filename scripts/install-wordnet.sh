#!/usr/bin/env bash
# Installs the demo data source, Debian's wordnet-base (WordNet 3.0 glosses), if it is missing.
set -euo pipefail
if [ -f /usr/share/wordnet/data.noun ]; then
  exit 0
fi
echo "Installing the demo data source (Debian package wordnet-base, 6.5 MB)..."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wordnet-base >/dev/null
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null && command -v apt-get >/dev/null; then
  sudo apt-get update -qq && sudo apt-get install -y -qq wordnet-base >/dev/null
else
  cat >&2 <<'MSG'
The demo needs WordNet from Debian/Ubuntu's package wordnet-base, and it could not be installed here.
Run:   sudo apt-get install wordnet-base
or point params.yaml at your own data (ingest.source: {kind: files, path: ...}).
MSG
  exit 1
fi
test -f /usr/share/wordnet/data.noun
