#!/usr/bin/env bash
# Fetches ONNX Runtime's C/C++ headers into $1 (headers end up in $1/usr/include/onnxruntime).
#
# No onnxruntime wheel ships its headers. Debian trixie's libonnxruntime-dev (MIT) does, and its
# C API (ORT_API_VERSION 21) is a prefix of the runtime's we load (1.31: the C API is append-only).
# The package index is derived from this machine's own Debian sources (bookworm -> trixie, no
# security suite), and apt runs against private state folders: nothing is installed system-wide.
set -euo pipefail
mkdir -p "$1"
dest=$(cd "$1" && pwd)   # apt resolves relative Dir:: options against /etc/apt
hdr="$dest/usr/include/onnxruntime/onnxruntime_cxx_api.h"
[ -f "$hdr" ] && exit 0
command -v apt-get >/dev/null && command -v dpkg >/dev/null || {
  echo "fetch_ort_headers: apt-get and dpkg are needed to fetch ONNX Runtime's headers; set ORT_INCLUDE_DIR to a folder holding onnxruntime_cxx_api.h instead" >&2
  exit 1
}
sources=$(ls /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$sources" ] || { echo "fetch_ort_headers: no /etc/apt/sources.list.d/debian.sources to derive a package index from; set ORT_INCLUDE_DIR" >&2; exit 1; }
apt="$dest/apt"
mkdir -p "$apt/sources.d" "$apt/lists/partial" "$apt/cache/archives/partial"
: > "$apt/sources.list"
# Paragraphs (RS="") that mention security are dropped: trixie-security has no such package.
sed 's/bookworm-updates/trixie-updates/; s/bookworm/trixie/' "$sources" \
  | awk 'BEGIN{RS="";ORS="\n\n"} !/security/' > "$apt/sources.d/debian.sources"
opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/sources.d"
      -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
echo "fetch_ort_headers: fetching libonnxruntime-dev (headers only) into $dest" >&2
apt-get -qq "${opts[@]}" update
(cd "$dest" && apt-get -qq "${opts[@]}" download libonnxruntime-dev && dpkg -x libonnxruntime-dev_*.deb .)
rm -rf "$apt" "$dest"/libonnxruntime-dev_*.deb
[ -f "$hdr" ] || { echo "fetch_ort_headers: the package held no onnxruntime_cxx_api.h" >&2; exit 1; }
