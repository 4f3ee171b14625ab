"""Glance's own cache drivers on the workloads of examples/workloads.rs.

Run by benches/glance/run.sh (which installs Glance from PyPI in a venv):

    python glance_side.py DRIVER DIR SCALE

prints one line per workload: `<workload> <rate per second> [note]`, the
same names and sizes as `cargo run --release --example workloads`.
"""
import os
import sys
import threading
import time

from oslo_config import cfg

import glance.image_cache  # noqa: registers the image_cache_* options
from glance.image_cache.drivers import sqlite as sqlite_driver
from glance.image_cache.drivers import xattr as xattr_driver

CONF = cfg.CONF


def driver_for(kind, directory):
    os.makedirs(directory, exist_ok=True)
    CONF.set_override('image_cache_dir', directory)
    CONF.set_override('image_cache_sqlite_db', 'cache.db')
    CONF.set_override('image_cache_driver', kind)
    d = (sqlite_driver if kind == 'sqlite' else xattr_driver).Driver()
    d.configure()
    return d


def fill(d, image_id, data):
    with d.open_for_write(image_id) as f:
        f.write(data)


def read(d, image_id):
    with d.open_for_read(image_id) as f:
        n = 0
        for chunk in iter(lambda: f.read(65536), b''):
            n += len(chunk)
        return n


def threads(n, target):
    ts = [threading.Thread(target=target, args=(w,)) for w in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def main():
    kind, base, scale = sys.argv[1], sys.argv[2], int(sys.argv[3])
    small = b'\7' * 65536
    tiny = b'\3' * 4096
    fills, hits, entries = 100 * scale, 1000 * scale, 1500 * scale

    d = driver_for(kind, os.path.join(base, 'fill1'))
    t = time.monotonic()
    for i in range(fills):
        fill(d, 'one-%d' % i, small)
    print('fill_1', fills / (time.monotonic() - t))

    d = driver_for(kind, os.path.join(base, 'fill8'))
    t = time.monotonic()
    threads(8, lambda w: [fill(d, 'eight-%d-%d' % (w, i), small)
                          for i in range(fills // 8)])
    print('fill_8', fills // 8 * 8 / (time.monotonic() - t))

    d = driver_for(kind, os.path.join(base, 'hits'))
    fill(d, 'hot', small)
    before = d.get_hit_count('hot')
    t = time.monotonic()
    for _ in range(hits):
        read(d, 'hot')
    print('hit_1', hits / (time.monotonic() - t))
    t = time.monotonic()
    threads(8, lambda w: [read(d, 'hot') for _ in range(hits // 8)])
    rate = hits // 8 * 8 / (time.monotonic() - t)
    lost = hits + hits // 8 * 8 - (d.get_hit_count('hot') - before)
    print('hit_8', rate, 'lost=%d' % lost)

    d = driver_for(kind, os.path.join(base, 'maint'))
    for i in range(entries):
        fill(d, 'img-%06d' % i, tiny)
    for i in range(entries):
        read(d, 'img-%06d' % i)
    t = time.monotonic()
    assert len(d.get_cached_images()) == entries
    print('list', entries / (time.monotonic() - t))
    # Glance's ImageCache.prune, on the driver, to half.
    t = time.monotonic()
    current, target, pruned = d.get_cache_size(), entries // 2 * 4096, 0
    entry = d.get_least_recently_accessed()
    while entry and current > target:
        image_id, size = entry
        d.delete_cached_image(image_id)
        current -= size
        pruned += 1
        entry = d.get_least_recently_accessed()
    print('prune', pruned / (time.monotonic() - t))
    k = entries // 2
    for i in range(k):
        with open(os.path.join(d.invalid_dir, 'bad-%d' % i), 'wb') as f:
            f.write(tiny)
        with open(os.path.join(d.incomplete_dir, 'dead-%d' % i), 'wb') as f:
            f.write(tiny)
    t = time.monotonic()
    d.clean(stall_time=0)
    print('clean', 2 * k / (time.monotonic() - t))


if __name__ == '__main__':
    CONF([], project='glance')
    main()
