//! The store's connections: a few, made on demand and dropped when broken,
//! each with the statements prepared on it; and the database's address as
//! every message shows it (without its password).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use parking_lot::Mutex;
use postgres::error::SqlState;
use postgres::{Client, NoTls};

use super::POOL_IDLE;
use crate::error::{Error, Result, StoreError, StoreErrorKind};

/// `url` without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match postgres::Config::from_str(url) {
        Ok(c) => describe(&c),
        Err(_) => "<an unparsable database URL>".into(),
    }
}

pub(super) fn describe(c: &postgres::Config) -> String {
    let host = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(h) => h.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let port = c
        .get_ports()
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    // The one form every message uses ([`crate::redact_url`]'s): the
    // password, if any, as `***`.
    format!(
        "postgres://{}{}@{}{}{}/{}",
        c.get_user().unwrap_or(""),
        if c.get_password().is_some() {
            ":***"
        } else {
            ""
        },
        host,
        if port.is_empty() { "" } else { ":" },
        port,
        c.get_dbname().unwrap_or("")
    )
}

/// A few connections, made on demand and dropped when broken.
pub(super) struct Pool {
    pub(super) config: postgres::Config,
    pub(super) location: String,
    pub(super) idle: Mutex<Vec<Session>>,
    /// Statements sent (each one round trip), prepares included.
    pub(super) trips: Arc<std::sync::atomic::AtomicU64>,
}

/// A connection and the statements prepared on it: a statement is parsed
/// once per connection, so that each later use is one round trip.
pub(super) struct Session {
    pub(super) client: Client,
    pub(super) prepared: HashMap<String, postgres::Statement>,
    pub(super) trips: Arc<std::sync::atomic::AtomicU64>,
}

pub(super) type Params<'a> = &'a [&'a (dyn postgres::types::ToSql + Sync)];
pub(super) type PgResult<T> = std::result::Result<T, postgres::Error>;

impl Session {
    pub(super) fn statement(&mut self, sql: &str) -> PgResult<postgres::Statement> {
        use std::sync::atomic::Ordering::Relaxed;
        self.trips.fetch_add(1, Relaxed);
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        self.trips.fetch_add(1, Relaxed);
        let s = self.client.prepare(sql)?;
        self.prepared.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    pub(super) fn exec(&mut self, sql: &str, params: Params<'_>) -> PgResult<u64> {
        let s = self.statement(sql)?;
        self.client.execute(&s, params)
    }

    pub(super) fn rows(&mut self, sql: &str, params: Params<'_>) -> PgResult<Vec<postgres::Row>> {
        let s = self.statement(sql)?;
        self.client.query(&s, params)
    }

    pub(super) fn one(&mut self, sql: &str, params: Params<'_>) -> PgResult<postgres::Row> {
        let s = self.statement(sql)?;
        self.client.query_one(&s, params)
    }

    pub(super) fn opt(&mut self, sql: &str, params: Params<'_>) -> PgResult<Option<postgres::Row>> {
        let s = self.statement(sql)?;
        self.client.query_opt(&s, params)
    }
}

impl std::ops::Deref for Session {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// A connection out of the pool; back into it on drop unless broken.
pub(super) struct Conn<'a> {
    pub(super) pool: &'a Pool,
    pub(super) session: Option<Session>,
    /// Whether it came from the idle ones (it may have been closed since).
    pub(super) used: bool,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        self.session
            .as_ref()
            .expect("a pooled connection is present until dropped")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Session {
        self.session
            .as_mut()
            .expect("a pooled connection is present until dropped")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.session.take() {
            if !c.client.is_closed() {
                let mut idle = self.pool.idle.lock();
                if idle.len() < POOL_IDLE {
                    idle.push(c);
                }
            }
        }
    }
}

impl Pool {
    pub(super) fn get(&self) -> Result<Conn<'_>> {
        let pooled = self.idle.lock().pop();
        match pooled {
            Some(c) if !c.client.is_closed() => Ok(Conn {
                pool: self,
                session: Some(c),
                used: true,
            }),
            _ => self.fresh(),
        }
    }

    /// A client error as the crate's own, with the database's address
    /// (never its password).
    pub(super) fn error(&self, e: postgres::Error) -> Error {
        let kind = match e.code() {
            Some(c) if *c == SqlState::DISK_FULL => StoreErrorKind::NoSpace,
            Some(c)
                if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                StoreErrorKind::Busy
            }
            Some(c)
                if *c == SqlState::DATA_CORRUPTED
                    || *c == SqlState::INDEX_CORRUPTED
                    || *c == SqlState::UNDEFINED_COLUMN =>
            {
                StoreErrorKind::Corrupt
            }
            Some(c) if c.code().starts_with("08") || c.code().starts_with("57P") => {
                StoreErrorKind::Unavailable
            }
            Some(c) if *c == SqlState::TOO_MANY_CONNECTIONS => StoreErrorKind::Busy,
            Some(c) if *c == SqlState::STRING_DATA_RIGHT_TRUNCATION => StoreErrorKind::Other,
            Some(_) => StoreErrorKind::Other,
            // No SQL state: the connection failed, or a value did not convert.
            None if e.is_closed()
                || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
                || e.to_string().contains("connect") =>
            {
                StoreErrorKind::Unavailable
            }
            None => StoreErrorKind::Other,
        };
        Error::Store(StoreError::new(
            kind,
            "centralized_db",
            self.location.clone(),
            e,
        ))
    }

    /// Runs `f` on a pooled connection, mapping its error.
    pub(super) fn with<T>(
        &self,
        mut f: impl FnMut(&mut Session) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        let mut conn = self.get()?;
        let reused = conn.used;
        match f(&mut conn) {
            Ok(v) => Ok(v),
            // A pooled connection the server closed while it sat idle (a
            // restart): the sync client learns of it only on use. Once more
            // on a fresh one.
            Err(e) if reused && conn.client.is_closed() => {
                tracing::debug!("imgcache: {}: reconnecting after {e}", self.location);
                drop(conn);
                let mut fresh = self.fresh()?;
                f(&mut fresh).map_err(|e| self.error(e))
            }
            Err(e) => Err(self.error(e)),
        }
    }

    /// A new connection, not from the idle ones.
    pub(super) fn fresh(&self) -> Result<Conn<'_>> {
        Ok(Conn {
            pool: self,
            session: Some(Session {
                client: self.config.connect(NoTls).map_err(|e| self.error(e))?,
                prepared: HashMap::new(),
                trips: self.trips.clone(),
            }),
            used: false,
        })
    }
}
