//! The API server's connection table: how its connections are shared
//! between clients.
//!
//! At most `max` connections are open at once. A connection is *busy* while
//! one of its requests is being answered and *idle* otherwise (waiting for a
//! request head: a fresh connection, a keep-alive connection between
//! requests, or a client that is slow to send its head). When a new
//! connection arrives at the cap, the connection that has been idle longest
//! is closed to make room, so idle and keep-alive clients, however many,
//! cannot lock a new client out: it waits for no timeout. Only when every
//! connection is busy is the new one closed at once; a busy connection
//! frees its slot within the server's body and reply deadlines.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use tokio::sync::oneshot;

/// What the table has done so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Connections open now.
    pub open: usize,
    /// Idle connections closed to make room for a new one.
    pub evicted: u64,
    /// New connections closed at once because every open one was busy.
    pub refused: u64,
}

/// One connection's number in the table.
pub(crate) type ConnectionId = u64;

/// The table, shared by the accept loop and every connection's task.
#[derive(Debug)]
pub(crate) struct Connections {
    max: usize,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: ConnectionId,
    entries: BTreeMap<ConnectionId, Entry>,
    evicted: u64,
    refused: u64,
}

#[derive(Debug)]
struct Entry {
    /// Requests being answered on it now (hyper answers one at a time).
    busy: u32,
    /// Since when it has had no request being answered.
    idle_since: Instant,
    /// Fired to close it when it is evicted.
    evict: oneshot::Sender<()>,
}

/// A connection admitted to the table; it leaves the table when this is dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub(crate) id: ConnectionId,
    /// Resolves when the connection is evicted: its task then closes it.
    pub(crate) evicted: oneshot::Receiver<()>,
    table: Arc<Connections>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.table.lock().entries.remove(&self.id);
    }
}

/// A request being answered: the connection is busy until this is dropped.
#[derive(Debug)]
pub(crate) struct Busy {
    id: ConnectionId,
    table: Arc<Connections>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(e) = self.table.lock().entries.get_mut(&self.id) {
            e.busy = e.busy.saturating_sub(1);
            if e.busy == 0 {
                e.idle_since = Instant::now();
            }
        }
    }
}

impl Connections {
    /// A table of at most `max` connections (at least one).
    pub(crate) fn new(max: usize) -> Arc<Connections> {
        Arc::new(Connections { max: max.max(1), table: Mutex::default() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // Nothing panics while holding the lock; if it did, the table is
        // still consistent (each change is one map operation).
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a new connection, closing the longest-idle one if the table
    /// is full. `None` when every connection is busy: close the new one.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut t = self.lock();
        if t.entries.len() >= self.max {
            let oldest_idle = t
                .entries
                .iter()
                .filter(|(_, e)| e.busy == 0)
                .min_by_key(|(_, e)| e.idle_since)
                .map(|(&id, _)| id);
            match oldest_idle.and_then(|id| t.entries.remove(&id)) {
                Some(victim) => {
                    // The receiver may be gone already (its task ending).
                    let _ = victim.evict.send(());
                    t.evicted += 1;
                }
                None => {
                    t.refused += 1;
                    return None;
                }
            }
        }
        let id = t.next_id;
        t.next_id += 1;
        let (evict, evicted) = oneshot::channel();
        t.entries.insert(id, Entry { busy: 0, idle_since: Instant::now(), evict });
        Some(Admitted { id, evicted, table: self.clone() })
    }

    /// Marks connection `id` busy until the returned guard is dropped.
    pub(crate) fn busy(self: &Arc<Self>, id: ConnectionId) -> Busy {
        if let Some(e) = self.lock().entries.get_mut(&id) {
            e.busy += 1;
        }
        Busy { id, table: self.clone() }
    }

    /// How many are open now, and how many were evicted and refused so far.
    pub(crate) fn stats(&self) -> ConnectionStats {
        let t = self.lock();
        ConnectionStats { open: t.entries.len(), evicted: t.evicted, refused: t.refused }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_idle_connection_makes_room_and_busy_ones_are_kept() {
        let c = Connections::new(3);
        let mut a = c.admit().unwrap();
        let mut b = c.admit().unwrap();
        let mut d = c.admit().unwrap();
        // a is busy: b, idle longest, is closed for the fourth.
        let busy_a = c.busy(a.id);
        let _e = c.admit().unwrap();
        assert!(b.evicted.try_recv().is_ok(), "b evicted");
        assert!(a.evicted.try_recv().is_err() && d.evicted.try_recv().is_err());
        assert_eq!(c.stats().open, 3);
        // b's task ends: dropping it does not disturb the others.
        drop(b);
        assert_eq!(c.stats().open, 3);
        // a finishes and becomes the newest idle one: d goes next.
        drop(busy_a);
        let _f = c.admit().unwrap();
        assert!(d.evicted.try_recv().is_ok(), "d evicted");
        assert!(a.evicted.try_recv().is_err());
        assert_eq!((c.stats().evicted, c.stats().refused), (2, 0));
    }

    #[test]
    fn a_full_table_of_busy_connections_refuses_the_new_one() {
        let c = Connections::new(2);
        let a = c.admit().unwrap();
        let b = c.admit().unwrap();
        let (_ga, _gb) = (c.busy(a.id), c.busy(b.id));
        assert!(c.admit().is_none());
        assert_eq!((c.stats().evicted, c.stats().refused), (0, 1));
        drop(a);
        assert!(c.admit().is_some(), "room again once one closed");
    }
}
