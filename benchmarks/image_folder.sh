#!/usr/bin/env bash
# Prints the image folder (train/ and test/ class folders) that DATA names: DATA itself, or,
# where DATA is a .tgz holding one (../shared/data/cifar10-jpeg.tgz), the folder it unpacks
# to under DEST. Used by the scripts that train on CIFAR-10 image folders:
#
#   data=$(bash benchmarks/image_folder.sh DATA DEST) || exit 2
set -uo pipefail
data=${1:?usage: image_folder.sh DATA DEST}
dest=${2:?usage: image_folder.sh DATA DEST}
if [[ -f "$data" ]]; then
  tar xzf "$data" -C "$dest" || exit 2
  data=$(dirname "$(find "$dest" -maxdepth 3 -type d -name train | head -1)")
fi
echo "$data"
