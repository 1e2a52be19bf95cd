#!/usr/bin/env bash
# Makes Fashion-MNIST available offline to the demo and the tests.
#
# bingo_jax reads Fashion-MNIST from TFDS when `fashion_mnist` is prepared in the TFDS data
# directory, else from the files of the Debian package dataset-fashion-mnist
# (/usr/share/datasets/fashion-mnist/*.gz). This script does nothing when either is there;
# otherwise it installs the Debian package (apt-get, through sudo when not root) and, where
# that is impossible, tries TFDS's download. It exits non-zero, saying what to do, when
# neither works.
set -euo pipefail

debian_dir=/usr/share/datasets/fashion-mnist
tfds_dir="${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}/fashion_mnist"
python="${PYTHON:-python3}"
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && python=.venv/bin/python

have_data() {
  compgen -G "$tfds_dir/*/dataset_info.json" >/dev/null && return 0
  for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
              t10k-labels-idx1-ubyte; do
    [ -f "$debian_dir/$name.gz" ] || return 1
  done
}

have_data && exit 0
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; fi
  echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist" >&2
  $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 \
         && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || true
fi
have_data && exit 0
echo "Fashion-MNIST: trying the TFDS download" >&2
timeout 300 "$python" -c "import tensorflow_datasets as tfds; tfds.builder('fashion_mnist').download_and_prepare()" \
  >/dev/null 2>&1 || true
have_data && exit 0
echo "Fashion-MNIST not found: neither $debian_dir/*.gz (Debian package dataset-fashion-mnist)" \
     "nor a prepared TFDS fashion_mnist in $tfds_dir. Install one of them." >&2
exit 1
