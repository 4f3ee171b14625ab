#!/usr/bin/env bash
# imgcache against Glance's own cache drivers (Glance from PyPI, in a venv),
# the same workloads and sizes one after the other, twice, on the same disk:
#
#   bash benches/glance/run.sh [SCALE]      # SCALE 2 (default): 200 fills, 2000 hits, 3000 entries
#
# IMGCACHE_GLANCE_VENV (default: target/glance-venv), IMGCACHE_BENCH_DIR
# (default: the system temp dir), IMGCACHE_GLANCE_VERSION (default 33.0.0).
# On demand only (it installs Glance and its dependencies from PyPI).
set -euo pipefail
cd "$(dirname "$0")/../.."
scale=${1:-2}
# Glance, xattr and psycopg2-binary in the venv (installed once, kept).
venv=$(bash tests/glance/setup.sh)
cargo build --release --locked --example workloads
work=$(mktemp -d "${IMGCACHE_BENCH_DIR:-${TMPDIR:-/tmp}}/imgcache-glance.XXXXXX")
trap 'rm -rf "$work"' EXIT
results="$work/results"
for round in 1 2; do
  for driver in sqlite xattr; do
    "$venv/bin/python" benches/glance/glance_side.py "$driver" "$work/g-$round-$driver" "$scale" 2>/dev/null \
      | sed "s/^/$round $driver glance /" >>"$results"
    rm -rf "$work/g-$round-$driver"
    target/release/examples/workloads "$driver" "$work/i-$round-$driver" "$scale" \
      | sed "s/^/$round $driver imgcache /" >>"$results"
    rm -rf "$work/i-$round-$driver"
  done
done
echo "| workload | driver | Glance /s (rounds) | imgcache /s (rounds) | ratio (rounds) |"
echo "|---|---|---|---|---|"
python3 - "$results" <<'PY'
import collections, sys
rows = collections.defaultdict(lambda: collections.defaultdict(dict))
notes = {}
for line in open(sys.argv[1]):
    rnd, driver, side, name, rate, *note = line.split()
    rows[(name, driver)][side][rnd] = float(rate)
    if note:
        notes[(name, driver, side, rnd)] = note[0]
order = ['fill_1', 'fill_8', 'hit_1', 'hit_8', 'list', 'prune', 'clean']
for name in order:
    for driver in ['sqlite', 'xattr']:
        r = rows[(name, driver)]
        rounds = sorted(r['glance'])
        g = ' / '.join('%.0f' % r['glance'][x] for x in rounds)
        i = ' / '.join('%.0f' % r['imgcache'][x] for x in rounds)
        ratio = ' / '.join('%.2f' % (r['imgcache'][x] / r['glance'][x]) for x in rounds)
        extra = ''
        if name == 'hit_8':
            extra = ' (lost hits: Glance %s, imgcache %s)' % (
                ','.join(notes.get((name, driver, 'glance', x), '?').split('=')[-1] for x in rounds),
                ','.join(notes.get((name, driver, 'imgcache', x), '?').split('=')[-1] for x in rounds))
        print('| %s | %s | %s | %s | %s%s |' % (name, driver, g, i, ratio, extra))
PY
