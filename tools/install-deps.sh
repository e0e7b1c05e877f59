#!/bin/sh
# Installs everything ichtriage needs to build, run and test on Debian 12.
# Runs apt-get as root: as another user it asks sudo. python3-torch is for
# tests and benchmarks only (the VGG19 conversion test, the PyTorch peers of
# bench/): the node itself never runs Python.
set -eu
if [ "$(id -u)" != 0 ]; then exec sudo "$0" "$@"; fi
export DEBIAN_FRONTEND=noninteractive
pkgs="meson ninja-build pkg-config gcc g++ clang
  libdcmtk-dev dcmtk libsndfile1-dev libtiff-dev libssl-dev zlib1g-dev
  libsqlite3-dev sqlite3 libuv1-dev libh2o-dev libopenblas-dev libcjson-dev
  libinih-dev libpng-dev libsystemd-dev libcriterion-dev libcairo2-dev
  orthanc dicom3tools python3 python3-numpy python3-pydicom curl util-linux procps systemd
  openssl valgrind strace
  chromium firefox-esr python3-websocket python3-torch"
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $pkgs
