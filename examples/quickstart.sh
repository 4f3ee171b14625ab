#!/bin/sh
# The cache's main job with the `imgcache` tool, on the embedded default
# (SQLite in a local directory, ./imgcache-demo unless given another):
# a directory stands in for the backend; three images are queued,
# prefetched, one is fetched through the cache, and the cache is listed.
# Run it twice: the second run finds everything cached.
set -eu
dir=${1:-imgcache-demo}
mkdir -p "$dir/origin"
for spec in cirros-0.6.2:1048583 ubuntu-24.04-minimal:2500000 debian-12-genericcloud:1800000; do
  name=${spec%%:*}
  size=${spec##*:}
  if [ ! -f "$dir/origin/$name" ]; then
    head -c "$size" /dev/urandom > "$dir/origin/$name"
    # The expected checksum beside the image, as md5sum writes it.
    (cd "$dir/origin" && md5sum "$name" > "$name.md5")
  fi
done
cargo build -q --bin imgcache
imgcache() {
  printf '\n$ imgcache --dir %s %s\n' "$dir/cache" "$*"
  ./target/debug/imgcache --dir "$dir/cache" "$@"
}
imgcache queue-image cirros-0.6.2 ubuntu-24.04-minimal debian-12-genericcloud
imgcache list-queued
imgcache prefetch --origin "$dir/origin"
imgcache fetch cirros-0.6.2 --origin "$dir/origin" -o "$dir/cirros.img"
imgcache list-cached
imgcache stats
