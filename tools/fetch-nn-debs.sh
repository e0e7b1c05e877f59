#!/bin/sh
# tools/fetch-nn-debs.sh: the Debian 12 packages that nn/ needs beyond a C
# compiler, CUDA and cuDNN (OpenBLAS with its Fortran runtime, cJSON), as .deb
# files, for a GPU server that has no network and none of Debian's -dev
# packages. bench/gpu.sh unpacks them with `dpkg -x` into a local prefix and
# points the compiler, linker and loader there (CPATH, LIBRARY_PATH,
# LD_LIBRARY_PATH); nothing is installed.
#
#   tools/fetch-nn-debs.sh [DIR]     (default DIR: .nn-debs, git-ignored locally)
#
# Run it where apt works (no root needed: apt-get download). The bundle is a
# few MB; carry DIR to the GPU machine with the tree.
set -eu
cd "$(dirname "$0")/.."
DIR=${1:-.nn-debs}
# Runtime and headers only: libopenblas-pthread-dev holds cblas.h and the
# libopenblas.so link, libopenblas0-pthread the library itself (which needs
# libgfortran5 and, on x86-64, libquadmath0); libcjson-dev/libcjson1 likewise.
PKGS="libopenblas-pthread-dev libopenblas0-pthread libgfortran5 libquadmath0 libcjson-dev libcjson1"
mkdir -p "$DIR"
(cd "$DIR" && rm -f ./*.deb && apt-get download $PKGS)
# keep the bundle out of git without touching the shared .gitignore
if [ -d .git ] && ! grep -qx "/$DIR/" .git/info/exclude 2>/dev/null; then
    echo "/$DIR/" >>.git/info/exclude
fi
ls -l "$DIR"
