"""The pieces test_interop.py is made of: imgcache's CLI, Glance's own cache
drivers (in this process, configured through oslo.config as Glance
configures them), a throwaway PostgreSQL server, glance-manage.

Nothing here sleeps to wait for an event: waits poll for what they wait on
(a log line, a file, an attribute) under a deadline.
"""
import atexit
import contextlib
import datetime
import json
import logging
import os
import pwd
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request
import warnings

# Glance's imports warn about eventlet, DSA and deprecated options; its
# drivers log deprecations. The suite's output is the tests' own.
warnings.filterwarnings('ignore')
logging.getLogger().addHandler(logging.NullHandler())
logging.getLogger().setLevel(logging.CRITICAL)
# Glance's centralized_db rows hold naive UTC datetimes that its API turns
# into epoch seconds as local time: the suite runs in UTC.
os.environ['TZ'] = 'UTC'
time.tzset()

from oslo_concurrency import lockutils  # noqa: E402
from oslo_config import cfg  # noqa: E402

import glance.common.config  # noqa: E402,F401 (worker_self_reference_url)
import glance.db.migration  # noqa: E402,F401 (the [database] options)
import glance.image_cache  # noqa: E402 (image_cache_* options, ImageCache)
from glance.image_cache.drivers import centralized_db as glance_central  # noqa: E402
from glance.image_cache.drivers import sqlite as glance_sqlite  # noqa: E402
from glance.image_cache.drivers import xattr as glance_xattr  # noqa: E402

CONF = cfg.CONF
CONF([], project='glance', default_config_files=[], default_config_dirs=[])

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _binary():
    path = os.environ.get('IMGCACHE_BIN')
    if path:
        return path
    fallback = os.path.join(ROOT, 'target', 'debug', 'imgcache')
    if os.access(fallback, os.X_OK):
        print('IMGCACHE_BIN is not set: using %s' % fallback, file=sys.stderr)
        return fallback
    raise SystemExit('set IMGCACHE_BIN to the imgcache binary '
                     '(cargo build --locked --bin imgcache)')


BIN = _binary()

# Regular files Glance leaves in the base directory besides images:
# oslo.concurrency's external lock files, as its sqlite and centralized_db
# drivers set lock_path to the cache directory (lockutils.set_defaults).
# Glance's get_cache_size and delete_all_cached_images count them as they
# count anything else; they are Glance's, not imgcache's, and not images.
GLANCE_OWN_FILES = {
    'image_cache_db_init',         # drivers/sqlite.py, configure
    'sqlite_centralized_migrate',  # sqlite_migration.py, Migrate.migrate
    'glance-cache-clean',          # api/v2/cached_images.py, clean
    'glance-cache-prune',          # api/v2/cached_images.py, prune
    'glance-cache',                # image_cache/prefetcher.py, run
}
SQLITE_DB = 'cache.db'
SQLITE_SIDE_FILES = {'cache.db-wal', 'cache.db-shm', 'cache.db-journal'}

# How long any one awaited event may take before a test gives up.
PATIENCE = 30.0


def is_root():
    return os.geteuid() == 0


# --- imgcache's CLI ---------------------------------------------------------

class Run:
    """One finished imgcache process."""

    def __init__(self, argv, rc, out, err):
        self.argv, self.rc, self.out, self.err = argv, rc, out, err

    def __repr__(self):
        return 'imgcache %s -> exit %s\nstdout: %s\nstderr: %s' % (
            ' '.join(self.argv[1:]), self.rc, self.out.strip()[:2000],
            self.err.strip()[:2000])

    def json(self):
        try:
            return json.loads(self.out)
        except ValueError:
            raise AssertionError('not JSON: %r' % self)


class Imgcache:
    """imgcache on one cache directory with one driver (and node)."""

    def __init__(self, base, driver='sqlite', db_url=None, node_url=None,
                 extra=()):
        self.base, self.driver = base, driver
        self.db_url, self.node_url = db_url, node_url
        self.extra = list(extra)

    def argv(self, *args, json_out=False):
        argv = [BIN, '--dir', self.base, '--driver', self.driver]
        if self.node_url:
            argv += ['--node-url', self.node_url]
        argv += self.extra
        if json_out:
            argv.append('--json')
        return argv + [str(a) for a in args]

    def env(self):
        env = dict(os.environ)
        for k in list(env):
            if k.startswith('IMGCACHE_') and k != 'IMGCACHE_BIN':
                del env[k]
        if self.db_url:
            env['IMGCACHE_DATABASE_URL'] = self.db_url
        env.pop('RUST_LOG', None)
        return env

    def run(self, *args, json_out=False, user=None, timeout=PATIENCE):
        argv = self.argv(*args, json_out=json_out)
        full = as_user(user) + argv if user else argv
        p = subprocess.run(full, env=self.env(), capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return Run(argv, p.returncode, p.stdout, p.stderr)

    def ok(self, *args, json_out=False, user=None):
        r = self.run(*args, json_out=json_out, user=user)
        if r.rc != 0:
            raise AssertionError('imgcache failed: %r' % r)
        return r

    def popen(self, *args, json_out=False):
        return subprocess.Popen(self.argv(*args, json_out=json_out),
                                env=self.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def listing(self, **kw):
        """list-cached --json as {id: entry}."""
        rows = self.ok('list-cached', json_out=True, **kw).json()
        return {r['id']: r for r in rows}

    def queued(self):
        return self.ok('list-queued', json_out=True).json()

    def stats(self):
        return self.ok('stats', json_out=True).json()

    def fetch(self, image_id, origin):
        return self.ok('fetch', image_id, '--origin', origin, '-o', os.devnull)


def as_user(user):
    """The prefix that runs a command as `user` with that user's group only."""
    group = {'nobody': 'nogroup'}.get(user, user)
    try:
        import grp
        grp.getgrnam(group)
    except KeyError:
        group = str(pwd.getpwnam(user).pw_gid)
    return ['setpriv', '--reuid', user, '--regid', group, '--clear-groups', '--']


def queued_ids(q):
    """Ids out of list-queued --json, whatever each row looks like."""
    return [x if isinstance(x, str) else x.get('id', x.get('image_id'))
            for x in q]


# --- images and origins -----------------------------------------------------

def body(image_id, size):
    """The bytes of an image: distinct per id, deterministic."""
    seed = (image_id + '|').encode()
    return (seed * (size // len(seed) + 1))[:size]


def make_origin(root, images):
    """A directory origin holding {id: size}."""
    origin = os.path.join(root, 'origin')
    os.makedirs(origin, exist_ok=True)
    for image_id, size in images.items():
        with open(os.path.join(origin, image_id), 'wb') as f:
            f.write(body(image_id, size))
    return origin


def regular_files(base):
    return sorted(n for n in os.listdir(base)
                  if os.path.isfile(os.path.join(base, n)))


def foreign_files(base, images):
    """Regular files in the base directory that are neither images, nor
    Glance's own (cache.db, its lock files): imgcache's, for Glance an image
    like any other."""
    return sorted(set(regular_files(base)) - set(images) - {SQLITE_DB}
                  - GLANCE_OWN_FILES)


def journal_mode(base):
    """cache.db's journal mode (None: no cache.db)."""
    path = os.path.join(base, SQLITE_DB)
    if not os.path.exists(path):
        return None
    import sqlite3
    conn = sqlite3.connect('file:%s?mode=ro' % path, uri=True, timeout=5)
    try:
        return conn.execute('PRAGMA journal_mode').fetchone()[0]
    finally:
        conn.close()


def wal_note(mode):
    if mode != 'wal':
        return 'cache.db journal_mode=%s' % mode
    return ('cache.db journal_mode=wal (persistent, set by imgcache): every '
            'connection Glance opens creates cache.db-wal and cache.db-shm, '
            'which its sqlite driver takes for images (get_cache_files '
            'skips cache.db only): delete_all_cached_images counts and '
            'deletes them, get_cache_size counts them while any connection '
            'is open')


def dir_listing(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def wait_for(what, predicate, deadline=PATIENCE):
    """Polls `predicate` until it returns a true value; fails after `deadline`."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError('no %s within %.0f s' % (what, deadline))
        time.sleep(0.01)


def next_second():
    """Returns once the wall clock's whole second has changed (Glance's
    xattr driver compares atimes in whole seconds)."""
    now = int(time.time())
    wait_for('the next second', lambda: int(time.time()) > now, deadline=5)


def get_xattr(path, name, default=None):
    try:
        return os.getxattr(path, name)
    except OSError:
        return default


# --- Glance's drivers -------------------------------------------------------

class GlanceNode:
    """One of Glance's cache drivers on one directory (and node), as
    glance-api configures it. Every call re-applies this node's settings:
    Glance's drivers read CONF (worker_self_reference_url, stall time, the
    lock path) at call time, and the suite runs several nodes in one
    process."""

    MODULES = {'sqlite': glance_sqlite, 'xattr': glance_xattr,
               'centralized_db': glance_central}

    def __init__(self, kind, base, node_url=None, db_url=None,
                 max_size=None):
        self.kind, self.base = kind, os.path.abspath(base)
        self.node_url, self.db_url, self.max_size = node_url, db_url, max_size
        self.apply()
        self.driver = self.MODULES[kind].Driver()
        self.driver.configure()

    def apply(self):
        CONF.set_override('image_cache_dir', self.base)
        CONF.set_override('image_cache_sqlite_db', SQLITE_DB)
        CONF.set_override('image_cache_driver', self.kind)
        CONF.set_override('worker_self_reference_url', self.node_url)
        if self.max_size is not None:
            CONF.set_override('image_cache_max_size', self.max_size)
        else:
            CONF.clear_override('image_cache_max_size')
        if self.db_url is not None:
            use_database(self.db_url)
        lockutils.set_defaults(self.base)

    def __getattr__(self, name):
        attr = getattr(self.driver, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.apply()
            return attr(*args, **kwargs)
        return call

    # Glance's own ways of writing and reading, as its API does.
    def write(self, image_id, data):
        self.apply()
        with self.driver.open_for_write(image_id) as f:
            f.write(data)

    def write_failing(self, image_id, data):
        """A fill that fails mid-way: Glance moves it to invalid/."""
        self.apply()
        try:
            with self.driver.open_for_write(image_id) as f:
                f.write(data)
                raise IOError('backend went away')
        except IOError:
            pass

    def read(self, image_id):
        self.apply()
        with self.driver.open_for_read(image_id) as f:
            return f.read()

    def listing(self):
        """get_cached_images as {id: row}."""
        self.apply()
        return {r['image_id']: r for r in self.driver.get_cached_images()}

    def prune(self, max_size):
        """Glance's own pruner, glance.image_cache.ImageCache.prune."""
        self.max_size = max_size
        self.apply()
        cache = glance.image_cache.ImageCache()
        return cache.prune()


_current_db = [None]


def use_database(sqlalchemy_url):
    """Points glance.db at a database (Glance's engine is process-global)."""
    if _current_db[0] == sqlalchemy_url:
        return
    from glance.db.sqlalchemy import api as db_api
    CONF.set_override('connection', sqlalchemy_url, group='database')
    db_api.clear_db_env()
    _current_db[0] = sqlalchemy_url


# --- PostgreSQL -------------------------------------------------------------

def _pg_bindir():
    dirs = []
    try:
        versions = sorted(os.listdir('/usr/lib/postgresql'),
                          key=lambda v: int(v) if v.isdigit() else 0,
                          reverse=True)
        dirs += [os.path.join('/usr/lib/postgresql', v, 'bin') for v in versions]
    except OSError:
        pass
    dirs += os.environ.get('PATH', '').split(os.pathsep)
    for d in dirs:
        if (os.path.isfile(os.path.join(d, 'initdb'))
                and os.path.isfile(os.path.join(d, 'pg_ctl'))):
            return d
    return None


_SUPERVISOR = r"""
DATA="$1"; BIN="$2"; PORT="$3"; AS="$4"
trap '' INT HUP PIPE
$AS "$BIN/initdb" -D "$DATA/db" -U imgcache --auth=trust -E UTF8 --no-sync \
    >"$DATA/initdb.log" 2>&1 \
  || { echo "FAILED initdb"; cat "$DATA/initdb.log"; rm -rf "$DATA"; exit 1; }
if $AS "$BIN/pg_ctl" -D "$DATA/db" -w -t 60 -l "$DATA/server.log" \
    -o "-p $PORT -k $DATA -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200" \
    start >/dev/null 2>&1; then
  echo READY
else
  echo "FAILED pg_ctl start"; cat "$DATA/server.log"
fi
cat >/dev/null
$AS "$BIN/pg_ctl" -D "$DATA/db" stop -m immediate -w -t 60 >/dev/null 2>&1
rm -rf "$DATA"
"""


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Postgres:
    """A throwaway PostgreSQL server (Debian's package): initdb into a
    temporary folder, the server on a free loopback port, as `postgres` (or
    `nobody`) when we are root. IMGCACHE_TEST_DATABASE_URL names a server to
    use instead (its user must be allowed to create databases)."""

    def __init__(self):
        self.data = None
        self.bindir = None
        self.as_prefix = []
        self.created = []
        external = os.environ.get('IMGCACHE_TEST_DATABASE_URL')
        self.external = bool(external)
        if external:
            from urllib.parse import urlsplit
            u = urlsplit(external)
            self.host, self.port = u.hostname, u.port or 5432
            self.userinfo = u.netloc.rsplit('@', 1)[0] if '@' in u.netloc else ''
            self.admin_db = u.path.lstrip('/') or 'postgres'
            return
        self.bindir = _pg_bindir()
        if not self.bindir:
            raise unittest.SkipTest(
                'no initdb/pg_ctl found (apt-get install postgresql)')
        self.data = tempfile.mkdtemp(prefix='imgcache-glance-pg-')
        if is_root():
            for name in ('postgres', 'nobody'):
                try:
                    pw = pwd.getpwnam(name)
                    break
                except KeyError:
                    pw = None
            if pw is None:
                raise unittest.SkipTest('root, and no postgres or nobody user')
            os.chown(self.data, pw.pw_uid, pw.pw_gid)
            self.as_prefix = ['setpriv', '--reuid', str(pw.pw_uid), '--regid',
                              str(pw.pw_gid), '--clear-groups', '--']
        self.host, self.port, self.userinfo, self.admin_db = (
            '127.0.0.1', _free_port(), 'imgcache', 'postgres')
        # The supervisor owns the server: initdb, pg_ctl start, then it
        # waits for its standard input to close (stop(), or this process
        # dying however it dies) and stops the server and removes the
        # folder, so nothing outlives the suite. Its own session: a ^C to
        # the suite does not kill it before it has cleaned up.
        self.supervisor = subprocess.Popen(
            ['sh', '-c', _SUPERVISOR, 'imgcache-glance-pg', self.data,
             self.bindir, str(self.port), ' '.join(self.as_prefix)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines = queue.Queue()

        def follow():
            for line in self.supervisor.stdout:
                lines.put(line.rstrip())
            lines.put(None)
        threading.Thread(target=follow, daemon=True).start()
        said, end = [], time.monotonic() + 120
        while True:
            try:
                line = lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                line = 'no READY within 120 s'
            if line == 'READY':
                break
            said.append(line or '')
            if line is None or line.startswith(('FAILED', 'no READY')):
                self.stop()
                raise RuntimeError('PostgreSQL did not start:\n'
                                   + '\n'.join(said))
        atexit.register(self.stop)

    def stop(self):
        if self.external:
            # Not ours to stop: drop what we made on it.
            created, self.created = self.created, []
            with contextlib.suppress(Exception):
                conn = self.connect(self.admin_db)
                conn.autocommit = True
                with conn.cursor() as cur:
                    for name in reversed(created):
                        cur.execute('DROP DATABASE IF EXISTS %s WITH (FORCE)' % name)
                conn.close()
            return
        sup = getattr(self, 'supervisor', None)
        if sup is not None and sup.poll() is None:
            with contextlib.suppress(OSError):
                sup.stdin.close()
            sup.wait(timeout=120)

    def url(self, dbname):
        """imgcache's URL of a database."""
        return 'postgres://%s@%s:%d/%s' % (self.userinfo, self.host, self.port,
                                          dbname)

    def sqlalchemy_url(self, dbname):
        """Glance's ([database] connection)."""
        return 'postgresql+psycopg2://%s@%s:%d/%s' % (
            self.userinfo, self.host, self.port, dbname)

    def connect(self, dbname):
        import psycopg2
        return psycopg2.connect(self.sqlalchemy_url(dbname).replace(
            'postgresql+psycopg2', 'postgresql'))

    def create_db(self, name, template=None):
        conn = self.connect(self.admin_db)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute('CREATE DATABASE %s%s' % (
                name, ' TEMPLATE %s' % template if template else ''))
        conn.close()
        self.created.append(name)
        return name

    def tables(self, dbname):
        conn = self.connect(dbname)
        with conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = 'public' ORDER BY 1")
            out = [r[0] for r in cur.fetchall()]
        conn.close()
        return out

    def schema_of(self, dbname, tables=('cached_images', 'node_reference')):
        """Columns, indexes and constraints of Glance's cache tables."""
        conn = self.connect(dbname)
        out = {}
        with conn.cursor() as cur:
            for t in tables:
                cur.execute(
                    "SELECT column_name, data_type, character_maximum_length, "
                    "is_nullable, column_default FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND table_name = %s "
                    "ORDER BY ordinal_position", (t,))
                out[t + ' columns'] = cur.fetchall()
                cur.execute("SELECT indexname, indexdef FROM pg_indexes "
                            "WHERE schemaname = 'public' AND tablename = %s "
                            "ORDER BY 1", (t,))
                out[t + ' indexes'] = cur.fetchall()
                cur.execute("SELECT conname, contype, pg_get_constraintdef(oid) "
                            "FROM pg_constraint WHERE conrelid = %s::regclass "
                            "ORDER BY 1", ('public.' + t,))
                out[t + ' constraints'] = cur.fetchall()
                cur.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = "
                            "%s::regclass AND NOT tgisinternal ORDER BY 1",
                            ('public.' + t,))
                out[t + ' triggers'] = cur.fetchall()
        conn.close()
        return out


def glance_manage(sqlalchemy_url, *args, workdir):
    """glance-manage with a minimal glance-api.conf: db_sync needs nothing
    but [database] connection."""
    conf = os.path.join(workdir, 'glance-api.conf')
    with open(conf, 'w') as f:
        f.write('[DEFAULT]\n\n[database]\nconnection = %s\n' % sqlalchemy_url)
    exe = os.path.join(os.path.dirname(sys.executable), 'glance-manage')
    argv = ([exe] if os.access(exe, os.X_OK) else
            [sys.executable, '-c', 'import sys; from glance.cmd.manage import '
             'main; sys.argv[0] = "glance-manage"; sys.exit(main())'])
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    p = subprocess.run(argv + ['--config-file', conf] + list(args),
                       capture_output=True, text=True, env=env,
                       timeout=120, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def tail(text, lines=12):
    """The end of glance-manage's output, its error's name first."""
    keep = [l for l in text.splitlines()
            if 'Warning' not in l and 'eventlet' not in l.lower()]
    errors = [l for l in keep if 'psycopg2.errors.' in l or 'Failed' in l]
    return '\n'.join(errors[:2] + ['...'] + keep[-lines:])


def utc_epoch(naive_utc):
    return naive_utc.replace(tzinfo=datetime.timezone.utc).timestamp()


# --- imgcache serve ---------------------------------------------------------

class Server:
    """`imgcache serve` from a directory origin on free loopback ports; its
    address is the line it prints when it listens."""

    def __init__(self, cache, origin, extra=()):
        self.proc = cache.popen(
            'serve', '--origin', origin, '--public', '--listen',
            '127.0.0.1:0', '--admin-listen', '127.0.0.1:0',
            '--prune-interval', '0', '--clean-interval', '0', *extra)
        self.lines = queue.Queue()
        self.log = []
        threading.Thread(target=self._follow, args=(self.proc.stderr,),
                         daemon=True).start()
        threading.Thread(target=self._follow, args=(self.proc.stdout,),
                         daemon=True).start()
        end = time.monotonic() + PATIENCE
        self.data = None
        while self.data is None:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError('imgcache serve printed no address: %s'
                                     % '\n'.join(self.log))
            if line is None:
                if self.proc.poll() is not None:
                    raise AssertionError('imgcache serve exited (%s): %s' % (
                        self.proc.returncode, '\n'.join(self.log)))
                continue
            if 'serving' in line and 'http://' in line:
                urls = ['http://' + part.split('/', 1)[0]
                        for part in line.split('http://')[1:]]
                self.data = urls[0]
                self.admin = urls[1] if len(urls) > 1 else None

    def _follow(self, stream):
        with stream:
            for line in stream:
                self.log.append(line.rstrip())
                self.lines.put(line)
        self.lines.put(None)

    def get(self, image_id):
        """GETs an image; returns (status, x-imgcache, body) after the whole
        body (a miss's last byte comes after its fill committed)."""
        with urllib.request.urlopen('%s/v2/images/%s/file' % (self.data, image_id),
                                    timeout=PATIENCE) as r:
            return r.status, r.headers.get('x-imgcache'), r.read()

    def cache_listing(self):
        """The management API's GET /v2/cache: held hits are written
        before it reports."""
        with urllib.request.urlopen(self.admin + '/v2/cache',
                                    timeout=PATIENCE) as r:
            return json.loads(r.read())

    def kill(self):
        """SIGKILL, and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=PATIENCE)
