#!/usr/bin/env bash
# Installs the image demo data source, Debian's dataset-fashion-mnist (Fashion-MNIST, MIT), if missing.
set -euo pipefail
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  exit 0
fi
echo "Installing the image demo data source (Debian package dataset-fashion-mnist, 30 MB)..."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null && command -v apt-get >/dev/null; then
  sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  cat >&2 <<'MSG'
The image demo needs Fashion-MNIST from Debian/Ubuntu's package dataset-fashion-mnist, and it could
not be installed here.
Run:   sudo apt-get install dataset-fashion-mnist
or use your own images (a folder per class, or a manifest: see tunery/data/images.py).
MSG
  exit 1
fi
test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
