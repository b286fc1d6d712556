//! A small pool of blocking store connections, used from async handlers through
//! `spawn_blocking` (the SQLite and PostgreSQL clients are blocking).

use crate::{Result, ServeError};
use hilrig_campaigns::store::{Store, StoreError};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The results store, shared by the handlers.
pub struct Db {
    spec: String,
    conns: Vec<Mutex<Store>>,
    next: AtomicUsize,
}

impl Db {
    /// Open `conns` connections to the store named by `spec` (a SQLite path or a
    /// `postgresql://` URL).
    pub fn open(spec: &str, conns: usize) -> Result<Arc<Db>> {
        let conns = (0..conns.max(1))
            .map(|_| Store::open(Path::new(spec)).map(Mutex::new))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Arc::new(Db {
            spec: spec.to_string(),
            conns,
            next: AtomicUsize::new(0),
        }))
    }

    /// The store's name as given (a URL keeps its password: do not print it).
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// Run `f` on a connection, blocking (for the CLI and workers).
    pub fn blocking<T>(
        &self,
        f: impl FnOnce(&mut Store) -> std::result::Result<T, StoreError>,
    ) -> Result<T> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        // A free connection if there is one, else wait for ours.
        for k in 0..n {
            if let Ok(mut s) = self.conns[(start + k) % n].try_lock() {
                return f(&mut s).map_err(ServeError::from);
            }
        }
        let mut s = self.conns[start].lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s).map_err(ServeError::from)
    }

    /// Run `f` on a connection from async code.
    pub async fn with<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Store) -> std::result::Result<T, StoreError> + Send + 'static,
    ) -> Result<T> {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.blocking(f))
            .await
            .map_err(|e| ServeError::Task(e.to_string()))?
    }
}

impl Drop for Db {
    /// The PostgreSQL client blocks on its own runtime when dropped, which
    /// panics on a tokio worker: drop the connections on a plain thread then.
    fn drop(&mut self) {
        let conns = std::mem::take(&mut self.conns);
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::spawn(move || drop(conns)).join();
        }
    }
}
