"""imgcache beside OpenStack Glance's own image cache code, both ways.

Glance (from PyPI, in a venv: tests/glance/setup.sh) writes cache
directories and PostgreSQL rows with its own drivers; imgcache (its CLI,
$IMGCACHE_BIN) reads, changes and writes them; Glance's drivers must then
see exactly the result, and the other way round. Exact results: ids, sizes,
hit counts, what a prune removes.

    cd tests/glance && IMGCACHE_BIN=../../target/debug/imgcache \\
        ../../target/glance-venv/bin/python -m unittest -v

The centralized_db cases start a throwaway PostgreSQL server (Debian's
postgresql package); without one they are skipped with a message, unless
IMGCACHE_REQUIRE_POSTGRES=1. The read-only cases need root (to run imgcache
as nobody) and are skipped otherwise.

Run by tests/glance_interop.rs under `cargo test --test glance_interop`.

What Glance's code does that these tests lean on (Glance 33.0.0):

- Every regular file in the base directory but the database is an image to
  Glance: its xattr get_cached_images lists it, get_cache_size and
  delete_all_cached_images (sqlite, xattr, centralized_db) count it, and
  the sqlite driver skips cache.db only, not cache.db-wal / -shm.
- Its sqlite and centralized_db drivers set oslo.concurrency's lock_path to
  the cache directory, so Glance's own external locks are 0-byte regular
  files there (harness.GLANCE_OWN_FILES): expected, never imgcache's.
- Its xattr driver's LRU is st_atime in whole seconds, ties by size.
- glance-manage db_sync needs nothing but [database] connection;
  `db check` refuses PostgreSQL ("Rolling upgrades are currently supported
  only for MySQL and Sqlite"), so `db upgrade` and `db version` are used.
"""
import os
import shutil
import signal
import tempfile
import threading
import time
import unittest

import harness as h

# Glance-written directories: ids, sizes written in this order, and Glance
# reads a, a, b, c, c, c. Reading in first-read order = last-read order keeps
# the LRU order the same under relatime atimes (Glance's xattr driver) and
# last_accessed (its sqlite driver): d (written last, never read), a, b, c.
GLANCE_IMAGES = {'img-a': 1000, 'img-b': 2000, 'img-c': 4000, 'img-d': 8000}
GLANCE_READS = ['img-a', 'img-a', 'img-b', 'img-c', 'img-c', 'img-c']
GLANCE_HITS = {'img-a': 2, 'img-b': 1, 'img-c': 3, 'img-d': 0}

# imgcache-written directories: filled in this order, then read a, a, b, c:
# LRU order d, a, b, c.
IMGCACHE_IMAGES = {'i-a': 1500, 'i-b': 2500, 'i-c': 3500, 'i-d': 4500}
IMGCACHE_READS = ['i-a', 'i-a', 'i-b', 'i-c']
IMGCACHE_HITS = {'i-a': 2, 'i-b': 1, 'i-c': 1, 'i-d': 0}

DAY = 86400


def sizes(listing):
    return {k: v['size'] for k, v in listing.items()}


def hits(listing):
    return {k: v['hits'] for k, v in listing.items()}


class Tmp(unittest.TestCase):
    """A temporary folder per test."""

    maxDiff = None

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='imgcache-glance-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    def assertNoForeignFiles(self, base, images, who):
        foreign = h.foreign_files(base, images)
        side = sorted(set(h.regular_files(base)) & h.SQLITE_SIDE_FILES)
        self.assertEqual(
            foreign, [],
            '%s: regular files of imgcache\'s own in the base directory %s: '
            'Glance takes every regular file there for an image (its xattr '
            'get_cached_images lists it, get_cache_size and '
            'delete_all_cached_images count it)' % (who, foreign))
        self.assertEqual(
            side, [], '%s: SQLite side files %s left in the base directory '
            'after imgcache exited: Glance\'s sqlite get_cache_size counts '
            'them' % (who, side))


# --- Glance writes, imgcache reads and changes, Glance looks ------------------

class GlanceWrites:
    DRIVER = None

    def setUp(self):
        super().setUp()
        self.base = self.path('cache')
        self.glance = h.GlanceNode(self.DRIVER, self.base)
        for image_id, size in GLANCE_IMAGES.items():
            self.glance.write(image_id, h.body(image_id, size))
        for image_id in GLANCE_READS:
            self.assertEqual(self.glance.read(image_id),
                             h.body(image_id, GLANCE_IMAGES[image_id]))
        self.assertTrue(self.glance.queue_image('img-q1'))
        self.glance.write_failing('img-bad', b'x' * 500)
        # A writer that died two days ago, and one that may still be writing.
        stalled = os.path.join(self.base, 'incomplete', 'img-stalled')
        with open(stalled, 'wb') as f:
            f.write(b's' * 700)
        old = time.time() - 2 * DAY
        os.utime(stalled, (old, old))
        with open(os.path.join(self.base, 'incomplete', 'img-filling'), 'wb') as f:
            f.write(b'f' * 300)
        self.assertEqual(hits(self.glance.listing()), GLANCE_HITS)
        self.assertEqual(h.dir_listing(os.path.join(self.base, 'invalid')),
                         ['img-bad'])
        self.cache = h.Imgcache(self.base, self.DRIVER)
        self.empty_origin = self.path('no-origin')
        os.mkdir(self.empty_origin)

    def test_imgcache_lists_reads_prunes_cleans_queues_deletes(self):
        g, c, base = self.glance, self.cache, self.base
        with self.subTest('imgcache lists what Glance wrote'):
            listing = c.listing()
            self.assertEqual(sizes(listing), GLANCE_IMAGES)
            self.assertEqual(hits(listing), GLANCE_HITS)
            self.assertEqual(h.queued_ids(c.queued()), ['img-q1'])
            st = c.stats()
            self.assertEqual((st['entries'], st['bytes'], st['hits'],
                              st['queued'], st['invalid']),
                             (4, 15000, 6, 1, 1), st)
        with self.subTest('an imgcache read is a hit in Glance\'s place'):
            r = c.fetch('img-a', self.empty_origin)
            self.assertIn('hit', r.err)
            self.assertEqual(g.get_hit_count('img-a'), 3)
            self.assertEqual(g.listing()['img-a']['hits'], 3)
        with self.subTest('imgcache prunes in LRU order (d, b; a was just read)'):
            h.Imgcache(base, self.DRIVER, extra=['--max-size', '6000']).ok('prune')
            self.assertEqual(sorted(c.listing()), ['img-a', 'img-c'])
            self.assertEqual(sorted(g.listing()), ['img-a', 'img-c'])
            self.assertEqual([g.is_cached(i) for i in sorted(GLANCE_IMAGES)],
                             [True, False, True, False])
            self.assertEqual(g.get_cache_size(), 5000)
        with self.subTest('imgcache cleans invalid and stalled files only'):
            c.ok('clean')
            self.assertEqual(h.dir_listing(os.path.join(base, 'invalid')), [])
            self.assertEqual(h.dir_listing(os.path.join(base, 'incomplete')),
                             ['img-filling'])
            self.assertTrue(g.is_being_cached('img-filling'))
            self.assertFalse(g.is_being_cached('img-stalled'))
        with self.subTest('imgcache queues; Glance sees the queue in order'):
            c.ok('queue-image', 'img-q2')
            self.assertEqual(g.get_queued_images(), ['img-q1', 'img-q2'])
            self.assertTrue(g.is_queued('img-q2'))
        with self.subTest('imgcache deletes; Glance sees exactly the rest'):
            c.ok('delete-cached-image', 'img-c')
            listing = g.listing()
            self.assertEqual(sizes(listing), {'img-a': 1000})
            self.assertEqual(hits(listing), {'img-a': 3})
            self.assertEqual(g.get_cache_size(), 1000)
            self.assertFalse(g.is_cached('img-c'))
            self.assertEqual(g.get_hit_count('img-a'), 3)
        with self.subTest('Glance deletes all: it counts the images only'):
            files = h.regular_files(base)
            own = set(files) & h.GLANCE_OWN_FILES
            mode = h.journal_mode(base)
            self.assertEqual(g.delete_all_cached_images(), 1 + len(own),
                             'regular files in the base directory: %s; %s'
                             % (files, h.wal_note(mode)))
            self.assertEqual(c.listing(), {})

    def test_imgcache_leaves_no_file_glance_counts(self):
        self.cache.listing()
        self.cache.fetch('img-b', self.empty_origin)
        self.assertNoForeignFiles(self.base, GLANCE_IMAGES, 'after list-cached and a hit')
        try:
            listing = self.glance.listing()
        except Exception as e:  # noqa
            self.fail('Glance\'s get_cached_images raised %r' % e)
        self.assertEqual(sorted(listing), sorted(GLANCE_IMAGES))
        self.assertEqual(self.glance.get_cache_size(), sum(GLANCE_IMAGES.values()))


class GlanceWritesSqlite(GlanceWrites, Tmp):
    DRIVER = 'sqlite'


class GlanceWritesXattr(GlanceWrites, Tmp):
    DRIVER = 'xattr'


class GlanceLocks:
    """Glance's external lock files in the base directory (0-byte regular
    files, taken by name as Glance takes them, with lock_path the cache
    directory as its drivers set it) are not images."""
    DRIVER = None

    def test_imgcache_takes_no_glance_lock_file_for_an_image(self):
        from oslo_concurrency import lockutils
        base = self.path('cache')
        g = h.GlanceNode(self.DRIVER, base)
        g.write('img-a', h.body('img-a', 1000))
        for name in sorted(h.GLANCE_OWN_FILES):
            with lockutils.lock(name, external=True, lock_path=base):
                pass
        c = h.Imgcache(base, self.DRIVER)
        listing = c.listing()
        self.assertEqual(sorted(listing), ['img-a'],
                         'imgcache took Glance\'s lock files for images')
        self.assertEqual(c.stats()['entries'], 1)
        self.assertEqual(sorted(set(h.regular_files(base)) & h.GLANCE_OWN_FILES),
                         sorted(h.GLANCE_OWN_FILES), 'Glance\'s lock files are '
                         'Glance\'s: left in place')


class GlanceLocksSqlite(GlanceLocks, Tmp):
    DRIVER = 'sqlite'


class GlanceLocksXattr(GlanceLocks, Tmp):
    DRIVER = 'xattr'


# --- imgcache writes, Glance reads and changes, imgcache looks ----------------

class ImgcacheWrites:
    DRIVER = None

    def setUp(self):
        super().setUp()
        self.base = self.path('cache')
        self.origin = h.make_origin(self.tmp, IMGCACHE_IMAGES)
        self.cache = h.Imgcache(self.base, self.DRIVER)
        for image_id in IMGCACHE_IMAGES:
            r = self.cache.fetch(image_id, self.origin)
            self.assertIn('miss', r.err)
        # Glance's xattr pruner orders by whole seconds of atime (ties by
        # size): for its test, each image's first read in a second of its own.
        tick = (self.DRIVER == 'xattr'
                and self._testMethodName == 'test_glance_pruner_removes_the_lru_images')
        seen = set()
        for image_id in IMGCACHE_READS:
            if tick and image_id not in seen:
                h.next_second()
            seen.add(image_id)
            r = self.cache.fetch(image_id, self.origin)
            self.assertIn('hit', r.err)
        self.assertEqual(hits(self.cache.listing()), IMGCACHE_HITS)
        # What imgcache left once it exited, before Glance opens anything.
        self.left = h.regular_files(self.base)

    def glance(self):
        return h.GlanceNode(self.DRIVER, self.base)

    def test_glance_lists_exactly_the_images(self):
        self.assertNoForeignFiles(self.base, IMGCACHE_IMAGES,
                                  'after imgcache fetches')
        g = self.glance()
        try:
            listing = g.listing()
        except Exception as e:  # noqa
            self.fail('Glance\'s get_cached_images raised %r (base dir: %s)'
                      % (e, self.left))
        self.assertEqual(sizes(listing), IMGCACHE_IMAGES)
        self.assertEqual(hits(listing), IMGCACHE_HITS)
        self.assertEqual(g.get_cache_size(), sum(IMGCACHE_IMAGES.values()),
                         'base dir: %s' % h.regular_files(self.base))
        for image_id, n in IMGCACHE_HITS.items():
            self.assertTrue(g.is_cached(image_id))
            self.assertEqual(g.get_hit_count(image_id), n, image_id)
        for image_id in IMGCACHE_IMAGES:
            self.assertEqual(g.read(image_id),
                             h.body(image_id, IMGCACHE_IMAGES[image_id]))

    def test_glance_pruner_removes_the_lru_images(self):
        g = self.glance()
        # 12 000 bytes to 6 000: d (4 500, never read) and a (1 500) go.
        pruned = g.prune(6000)
        self.assertEqual(sorted(g.listing()), ['i-b', 'i-c'],
                         'Glance\'s ImageCache.prune returned %s' % (pruned,))
        self.assertEqual(pruned, (2, 6000))
        listing = self.cache.listing()
        self.assertEqual(sizes(listing), {'i-b': 2500, 'i-c': 3500})
        self.assertEqual(hits(listing), {'i-b': 1, 'i-c': 1})

    def test_glance_delete_all_counts_the_images(self):
        g = self.glance()
        files = h.regular_files(self.base)
        own = set(files) & h.GLANCE_OWN_FILES
        mode = h.journal_mode(self.base)
        deleted = g.delete_all_cached_images()
        self.assertEqual(deleted - len(own), len(IMGCACHE_IMAGES),
                         'regular files in the base directory: %s; %s'
                         % (files, h.wal_note(mode)))
        self.assertEqual(self.cache.listing(), {})
        self.assertEqual(self.cache.stats()['entries'], 0)

    def test_glance_cleans_queues_deletes_and_imgcache_sees(self):
        c, base = self.cache, self.base
        # A fill imgcache refuses (wrong checksum at the origin): invalid/.
        with open(os.path.join(self.origin, 'i-bad'), 'wb') as f:
            f.write(b'b' * 800)
        with open(os.path.join(self.origin, 'i-bad.md5'), 'w') as f:
            f.write('0' * 32)
        r = c.run('fetch', 'i-bad', '--origin', self.origin, '-o', os.devnull)
        self.assertNotEqual(r.rc, 0, r)
        self.assertEqual(h.dir_listing(os.path.join(base, 'invalid')), ['i-bad'])
        g = self.glance()
        with self.subTest('Glance cleans imgcache\'s invalid files'):
            g.clean()
            self.assertEqual(h.dir_listing(os.path.join(base, 'invalid')), [])
            self.assertEqual(c.stats()['invalid'], 0)
        with self.subTest('Glance queues, imgcache prefetches'):
            with open(os.path.join(self.origin, 'i-e'), 'wb') as f:
                f.write(h.body('i-e', 600))
            self.assertTrue(g.queue_image('i-e'))
            self.assertEqual(h.queued_ids(c.queued()), ['i-e'])
            c.ok('prefetch', '--origin', self.origin)
            self.assertEqual(g.get_queued_images(), [])
            self.assertTrue(g.is_cached('i-e'))
            self.assertEqual(g.listing()['i-e']['size'], 600)
            self.assertEqual(g.get_hit_count('i-e'), 0)
        with self.subTest('a Glance read is a hit in imgcache\'s place'):
            g.read('i-a')
            self.assertEqual(c.listing()['i-a']['hits'], 3)
        with self.subTest('Glance deletes one; imgcache sees the rest'):
            g.delete_cached_image('i-b')
            self.assertEqual(sorted(c.listing()), ['i-a', 'i-c', 'i-d', 'i-e'])
        with self.subTest('Glance writes; imgcache lists it'):
            g.write('g-new', h.body('g-new', 900))
            listing = c.listing()
            self.assertEqual(listing['g-new']['size'], 900)
            self.assertEqual(listing['g-new']['hits'], 0)
            c.fetch('g-new', self.origin)
            self.assertEqual(g.get_hit_count('g-new'), 1)


class ImgcacheWritesSqlite(ImgcacheWrites, Tmp):
    DRIVER = 'sqlite'


class ImgcacheWritesXattr(ImgcacheWrites, Tmp):
    DRIVER = 'xattr'


# --- SIGKILL ------------------------------------------------------------------

class Crash:
    DRIVER = None

    def served_then_killed(self, base, origin, fills, hit_ids, glance_written=()):
        """imgcache serve: GETs `fills` (misses), then `hit_ids` (hits);
        waits until the hits are recorded where Glance keeps them; SIGKILL."""
        server = h.Server(h.Imgcache(base, self.DRIVER), origin)
        try:
            for image_id in fills:
                status, how, data = server.get(image_id)
                self.assertEqual((status, how), (200, 'miss'), image_id)
            for image_id in hit_ids:
                status, how, data = server.get(image_id)
                self.assertEqual((status, how), (200, 'hit'), image_id)
            # The management API writes held hits before it reports.
            listed = server.cache_listing()
            self.assertEqual(sorted(x['image_id'] for x in listed['cached_images']),
                             sorted(set(fills) | set(glance_written)))
            for image_id in set(hit_ids) & set(glance_written):
                want = self.before[image_id] + hit_ids.count(image_id)
                h.wait_for('hits of %s recorded' % image_id,
                           lambda: self.recorded_hits(base, image_id) >= want)
        finally:
            server.kill()
        self.assertEqual(server.proc.returncode, -signal.SIGKILL)

    def recorded_hits(self, base, image_id):
        if self.DRIVER == 'xattr':
            v = h.get_xattr(os.path.join(base, image_id), 'user.hits', b'0')
            return int(v or 0)
        import sqlite3
        conn = sqlite3.connect('file:%s?mode=ro' % os.path.join(base, h.SQLITE_DB),
                               uri=True, timeout=5)
        try:
            row = conn.execute('SELECT hits FROM cached_images WHERE image_id = ?',
                               (image_id,)).fetchone()
        finally:
            conn.close()
        return row[0] if row else 0

    def test_killed_while_serving_fills_glance_sees_a_correct_dir(self):
        base = self.path('cache')
        images = {'k-a': 3000, 'k-b': 5000, 'k-c': 7000}
        origin = h.make_origin(self.tmp, images)
        self.before = {}
        self.served_then_killed(base, origin, list(images), ['k-a', 'k-a', 'k-c'])
        left = h.regular_files(base)
        g = h.GlanceNode(self.DRIVER, base)
        try:
            listing = g.listing()
        except Exception as e:  # noqa
            self.fail('Glance\'s get_cached_images raised %r (base dir: %s)' % (e, left))
        self.assertEqual(sizes(listing), images, 'base dir: %s' % left)
        self.assertEqual(g.get_cache_size(), sum(images.values()),
                         'base dir after SIGKILL: %s' % left)
        listing = h.Imgcache(base, self.DRIVER).listing()
        self.assertEqual(sizes(listing), images)
        self.assertEqual(h.dir_listing(os.path.join(base, 'invalid')), [])
        self.assertNoForeignFiles(base, images, 'reopened after the SIGKILL')

    def test_killed_after_hits_on_glance_dir_quarantines_nothing(self):
        base = self.path('cache')
        g = h.GlanceNode(self.DRIVER, base)
        for image_id, size in GLANCE_IMAGES.items():
            g.write(image_id, h.body(image_id, size))
        for image_id in GLANCE_READS:
            g.read(image_id)
        self.before = dict(GLANCE_HITS)
        empty = self.path('no-origin')
        os.mkdir(empty)
        # A clean first session (the watermark recorded), then the one killed.
        h.Imgcache(base, self.DRIVER).listing()
        reads = ['img-a', 'img-b', 'img-d', 'img-d']
        self.served_then_killed(base, empty, [], reads,
                                glance_written=GLANCE_IMAGES)
        r = h.Imgcache(base, self.DRIVER).ok('list-cached', json_out=True)
        invalid = h.dir_listing(os.path.join(base, 'invalid'))
        self.assertEqual(invalid, [], 'imgcache moved intact Glance-written '
                         'images to invalid/ when reopening after the SIGKILL '
                         '(stderr: %s)' % r.err.strip())
        listing = {x['id']: x for x in r.json()}
        self.assertEqual(sizes(listing), GLANCE_IMAGES)
        want = dict(GLANCE_HITS)
        for image_id in reads:
            want[image_id] += 1
        self.assertEqual(hits(listing), want)
        self.assertEqual(hits(h.GlanceNode(self.DRIVER, base).listing()), want)


class CrashSqlite(Crash, Tmp):
    DRIVER = 'sqlite'


class CrashXattr(Crash, Tmp):
    DRIVER = 'xattr'


# --- read-only inspection -------------------------------------------------------

class ReadOnly:
    DRIVER = None

    def setUp(self):
        super().setUp()
        if not h.is_root():
            self.skipTest('needs root to run imgcache as nobody')
        os.chmod(self.tmp, 0o755)
        self.base = self.path('cache')
        g = h.GlanceNode(self.DRIVER, self.base)
        for image_id, size in GLANCE_IMAGES.items():
            g.write(image_id, h.body(image_id, size))
        for image_id in GLANCE_READS:
            g.read(image_id)
        g.queue_image('img-q1')
        self.snapshot = self.state()

    def state(self):
        out = {}
        for root, dirs, files in os.walk(self.base):
            for name in files + dirs:
                p = os.path.join(root, name)
                st = os.lstat(p)
                out[os.path.relpath(p, self.base)] = (st.st_size, st.st_mtime_ns)
        return out

    def run_as_nobody(self, *args, json_out=False):
        r = h.Imgcache(self.base, self.DRIVER).run(*args, json_out=json_out,
                                                    user='nobody')
        self.assertEqual(r.rc, 0, 'as a user who may read but not write the '
                         'directory: %r' % r)
        self.assertTrue(r.err.strip(), 'nothing on stderr about what could '
                        'not be done read-only: %r' % r)
        return r

    def test_list_stats_verify_as_a_reader(self):
        with self.subTest('list-cached'):
            r = self.run_as_nobody('list-cached', json_out=True)
            listing = {x['id']: x for x in r.json()}
            self.assertEqual(sizes(listing), GLANCE_IMAGES)
            self.assertEqual(hits(listing), GLANCE_HITS)
        with self.subTest('stats'):
            st = self.run_as_nobody('stats', json_out=True).json()
            self.assertEqual((st['entries'], st['bytes'], st['hits'], st['queued']),
                             (4, 15000, 6, 1), st)
        with self.subTest('verify'):
            self.run_as_nobody('verify')
        self.assertEqual(self.state(), self.snapshot, 'the directory changed')


class ReadOnlySqlite(ReadOnly, Tmp):
    DRIVER = 'sqlite'


class ReadOnlyXattr(ReadOnly, Tmp):
    DRIVER = 'xattr'


# --- centralized_db on a real PostgreSQL ----------------------------------------

_pg = []


def postgres():
    """The module's server, started on first use (None: skipped)."""
    if not _pg:
        try:
            _pg.append(h.Postgres())
        except unittest.SkipTest as e:
            if os.environ.get('IMGCACHE_REQUIRE_POSTGRES') == '1':
                raise AssertionError('IMGCACHE_REQUIRE_POSTGRES=1 but no '
                                     'PostgreSQL server: %s' % e)
            _pg.append(None)
            print('skipped: no PostgreSQL server for the centralized_db '
                  'cases: %s' % e, flush=True)
    if _pg[0] is None:
        raise unittest.SkipTest('no PostgreSQL server (see the message above)')
    return _pg[0]


def tearDownModule():
    if _pg and _pg[0] is not None:
        _pg[0].stop()


def uid(n):
    """An image id Glance's schema takes (VARCHAR(36), a UUID)."""
    return '%08x-0000-4000-8000-%012x' % (n, n)


IMGCACHE_NODE = 'http://imgcache-node:9292'
GLANCE_NODE = 'http://glance-node:9292'


class CentralizedDb(Tmp):
    # Glance's schema as db_sync made it, copied for each test (one db_sync
    # of two seconds instead of one per test).
    TEMPLATE = 'glance_template_%d' % os.getpid()
    _serial = [0]

    @classmethod
    def setUpClass(cls):
        cls.pg = postgres()
        work = tempfile.mkdtemp(prefix='imgcache-glance-sync-')
        try:
            cls.pg.create_db(cls.TEMPLATE)
            rc, out, err = h.glance_manage(
                cls.pg.sqlalchemy_url(cls.TEMPLATE), 'db_sync', workdir=work)
            if rc != 0:
                raise AssertionError('glance-manage db_sync failed on an '
                                     'empty database:\n' + h.tail(out + err))
            rc, out, err = h.glance_manage(cls.pg.sqlalchemy_url(cls.TEMPLATE),
                                           'db', 'version', workdir=work)
            if rc != 0:
                raise AssertionError('glance-manage db version failed:\n'
                                     + h.tail(out + err))
            cls.head = out.strip()
        finally:
            shutil.rmtree(work, True)

    def new_db(self, synced=True):
        """A database of this test's own: Glance's schema as db_sync made
        it (a copy of the template), or empty."""
        self._serial[0] += 1
        name = 'db_%s_%d_%d' % (self._testMethodName[5:30].lower(), os.getpid(),
                                self._serial[0])
        self.pg.create_db(name, template=self.TEMPLATE if synced else None)
        return name

    def imgcache(self, db, base, node=IMGCACHE_NODE, extra=()):
        return h.Imgcache(base, 'centralized_db', db_url=self.pg.url(db),
                          node_url=node, extra=extra)

    def glance(self, db, base, node):
        return h.GlanceNode('centralized_db', base, node_url=node,
                            db_url=self.pg.sqlalchemy_url(db))

    def manage(self, db, *args):
        return h.glance_manage(self.pg.sqlalchemy_url(db), *args, workdir=self.tmp)

    def test_order_a_db_sync_then_imgcache_two_nodes_one_fleet(self):
        db = self.new_db()
        x1, x2, x3 = uid(1), uid(2), uid(3)
        origin = h.make_origin(self.tmp, {x1: 1111, x2: 2222})
        i = self.imgcache(db, self.path('node-i'))
        self.assertEqual(i.listing(), {}, 'first start on Glance\'s schema')
        for image_id in (x1, x2, x1, x1):
            i.fetch(image_id, origin)
        g = self.glance(db, self.path('node-g'), GLANCE_NODE)
        g.write(x1, h.body(x1, 1111))
        g.write(x3, h.body(x3, 3333))
        for image_id in (x1, x3, x3, x3):
            g.read(image_id)
        # Glance's driver on imgcache's node (two programs, one node).
        gi = self.glance(db, self.path('node-i'), IMGCACHE_NODE)
        with self.subTest('each sees its own node\'s rows'):
            self.assertEqual(sizes(gi.listing()), {x1: 1111, x2: 2222})
            self.assertEqual(hits(gi.listing()), {x1: 2, x2: 0})
            self.assertEqual(hits(g.listing()), {x1: 1, x3: 3})
            self.assertEqual(hits(i.listing()), {x1: 2, x2: 0})
            now = time.time()
            for row in gi.listing().values():
                self.assertLess(abs(row['last_accessed'] - now), 300, row)
        with self.subTest('each sees the other node'):
            self.assertEqual(sorted(g.get_cached_nodes(x1)),
                             sorted([GLANCE_NODE, IMGCACHE_NODE]))
            self.assertEqual(g.get_cached_nodes(x2), [IMGCACHE_NODE])
            self.assertEqual(g.get_cached_nodes(x3), [GLANCE_NODE])
            nodes = i.ok('nodes', x1, json_out=True).json()
            self.assertEqual(sorted(nodes['nodes']),
                             sorted([GLANCE_NODE, IMGCACHE_NODE]))
            rows = i.ok('list-cached', '--all-nodes', json_out=True).json()
            self.assertEqual(sorted((r['node'], r['id'], r['hits']) for r in rows),
                             sorted([(IMGCACHE_NODE, x1, 2), (IMGCACHE_NODE, x2, 0),
                                     (GLANCE_NODE, x1, 1), (GLANCE_NODE, x3, 3)]))
        with self.subTest('hits add up on one node'):
            gi.read(x1)
            i.fetch(x1, origin)
            self.assertEqual(gi.get_hit_count(x1), 4)
            self.assertEqual(i.listing()[x1]['hits'], 4)
            self.assertEqual(gi.get_least_recently_accessed(), (x2, 2222))
        with self.subTest('deletes, both ways'):
            gi.delete_cached_image(x2)
            self.assertEqual(sorted(i.listing()), [x1])
            self.assertFalse(os.path.exists(self.path('node-i', x2)))
            i.ok('delete-cached-image', x1)
            self.assertEqual(gi.listing(), {})
            self.assertEqual(g.get_cached_nodes(x1), [GLANCE_NODE])
            self.assertEqual(hits(g.listing()), {x1: 1, x3: 3})
        with self.subTest('glance-manage runs cleanly after imgcache'):
            for args in (('db_sync',), ('db', 'upgrade'), ('db', 'version')):
                rc, out, err = self.manage(db, *args)
                self.assertEqual(rc, 0, 'glance-manage %s:\n%s' % (
                    ' '.join(args), h.tail(out + err)))
            self.assertEqual(out.strip(), self.head)

    def test_order_b_imgcache_first_refuses_then_db_sync(self):
        db = self.new_db(synced=False)
        x1 = uid(11)
        origin = h.make_origin(self.tmp, {x1: 1234})
        i = self.imgcache(db, self.path('node-i'))
        with self.subTest('imgcache refuses a database without Glance\'s tables'):
            r = i.run('list-cached')
            self.assertEqual(r.rc, 2, r)
            self.assertIn('glance-manage db_sync', r.err, r)
            self.assertIn('--create-tables', r.err, r)
        tables = self.pg.tables(db)
        with self.subTest('and creates nothing of Glance\'s'):
            self.assertEqual(set(tables) & {'cached_images', 'node_reference'},
                             set(), 'tables after imgcache: %s' % tables)
        with self.subTest('db_sync succeeds after imgcache'):
            rc, out, err = self.manage(db, 'db_sync')
            self.assertEqual(rc, 0, 'glance-manage db_sync after imgcache '
                             'touched the database (tables: %s):\n%s' % (
                                 tables, h.tail(out + err)))
        with self.subTest('imgcache starts on the synced database'):
            i.ok('list-cached')
            i.fetch(x1, origin)
            g = self.glance(db, self.path('node-i'), IMGCACHE_NODE)
            self.assertEqual(sizes(g.listing()), {x1: 1234})

    def test_create_tables_without_glance(self):
        db = self.new_db(synced=False)
        x1 = uid(21)
        origin = h.make_origin(self.tmp, {x1: 4321})
        i = self.imgcache(db, self.path('node-i'), extra=['--create-tables'])
        r = i.run('list-cached', json_out=True)
        self.assertEqual(r.rc, 0, '--create-tables on an empty database: %r' % r)
        i.fetch(x1, origin)
        self.assertEqual(sizes(i.listing()), {x1: 4321})

    def test_no_ddl_on_glance_tables(self):
        db = self.new_db()
        before = self.pg.schema_of(db)
        origin = h.make_origin(self.tmp, {uid(31): 100})
        i = self.imgcache(db, self.path('node-i'))
        i.listing()
        i.fetch(uid(31), origin)
        i.fetch(uid(31), origin)
        after = self.pg.schema_of(db)
        diff = []
        for key in before:
            added = [x for x in after[key] if x not in before[key]]
            removed = [x for x in before[key] if x not in after[key]]
            if added or removed:
                diff.append('%s: added %s, removed %s' % (key, added, removed))
        if diff:
            self.fail('imgcache changed Glance\'s tables as db_sync made '
                      'them:\n' + '\n'.join(diff))

    def test_glance_query_wait_during_imgcache_first_start(self):
        db = self.new_db()
        g = self.glance(db, self.path('node-g'), GLANCE_NODE)
        g.write(uid(41), h.body(uid(41), 100))
        self.assertEqual(len(g.listing()), 1)  # a warm connection
        driver = g.driver
        holder = self.pg.connect(db)  # psycopg2: a transaction until commit
        cur = holder.cursor()
        cur.execute('SELECT count(*) FROM cached_images')
        cur.fetchone()
        longest, errors, stop = [0.0], [], threading.Event()
        count = [0]

        def glance_queries():
            while not stop.is_set():
                t = time.monotonic()
                try:
                    driver.get_cached_images()
                except Exception as e:  # noqa
                    errors.append(repr(e))
                longest[0] = max(longest[0], time.monotonic() - t)
                count[0] += 1

        worker = threading.Thread(target=glance_queries, daemon=True)
        worker.start()
        h.wait_for('a first Glance query', lambda: count[0] > 0)
        i = self.imgcache(db, self.path('node-i'))
        proc = i.popen('list-cached')
        try:
            out, err = proc.communicate(timeout=h.PATIENCE)
        except Exception:
            proc.kill()
            out, err = proc.communicate()
        finally:
            holder.rollback()
            holder.close()
        stop.set()
        worker.join(h.PATIENCE)
        ms = longest[0] * 1000
        line = ('longest Glance query wait during imgcache start: %d ms '
                '(%d queries)' % (ms, count[0]))
        print('\n' + line, flush=True)
        problems = []
        if ms >= 100:
            problems.append('a Glance query waited %d ms (limit 100 ms)' % ms)
        if proc.returncode != 0:
            problems.append('imgcache\'s first start failed (exit %s): %s'
                            % (proc.returncode, err.strip()))
        if errors:
            problems.append('Glance\'s queries failed: %s' % errors[:3])
        if problems:
            self.fail('behind an open transaction that read cached_images: '
                      + '; '.join(problems))

    def test_imgcache_migrates_glance_sqlite_rows(self):
        base = self.path('node-m')
        u1, u2 = uid(51), uid(52)
        s = h.GlanceNode('sqlite', base)
        s.write(u1, h.body(u1, 1000))
        s.write(u2, h.body(u2, 2000))
        for image_id in (u1, u1, u2):
            s.read(image_id)
        rows = s.listing()
        db = self.new_db()
        i = self.imgcache(db, base)
        i.ok('migrate', '--from-sqlite')
        g = self.glance(db, base, IMGCACHE_NODE)
        listing = g.listing()
        self.assertEqual(sizes(listing), {u1: 1000, u2: 2000})
        self.assertEqual(hits(listing), {u1: 2, u2: 1})
        for image_id, row in rows.items():
            for key in ('last_accessed', 'last_modified'):
                self.assertAlmostEqual(listing[image_id][key], row[key], delta=1.0,
                                       msg='%s %s' % (image_id, key))
        self.assertEqual(hits(i.listing()), {u1: 2, u2: 1})

    def test_glance_migrates_imgcache_sqlite_rows(self):
        base = self.path('node-n')
        v1, v2 = uid(61), uid(62)
        origin = h.make_origin(self.tmp, {v1: 1500, v2: 2500})
        s = h.Imgcache(base, 'sqlite')
        for image_id in (v1, v2, v1, v1, v2):
            s.fetch(image_id, origin)
        self.assertEqual(hits(s.listing()), {v1: 2, v2: 1})
        db = self.new_db()
        g = self.glance(db, base, IMGCACHE_NODE)
        # What glance-api does at start with the centralized_db driver.
        from glance import sqlite_migration
        h.CONF.set_override('flavor', 'keystone+cachemanagement',
                            group='paste_deploy')
        try:
            g.apply()
            sqlite_migration.migrate_if_required()
        finally:
            h.CONF.clear_override('flavor', group='paste_deploy')
        listing = g.listing()
        self.assertEqual(sizes(listing), {v1: 1500, v2: 2500})
        self.assertEqual(hits(listing), {v1: 2, v2: 1})
        i = self.imgcache(db, base)
        self.assertEqual(hits(i.listing()), {v1: 2, v2: 1},
                         'regular files in the base directory: %s (Glance\'s '
                         'lock files: %s)' % (h.regular_files(base),
                                              sorted(h.GLANCE_OWN_FILES)))
        self.assertEqual(sizes(g.listing()), {v1: 1500, v2: 2500},
                         'Glance\'s rows after imgcache opened the migrated '
                         'directory')


if __name__ == '__main__':
    unittest.main()
