//! The event log: every change the controller sees or makes (hosts up and down, VMs
//! placed, plans and migrations moving through their phases), numbered, stored, and
//! served as server-sent events.

use crate::store::{Store, EVENTS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::broadcast;

pub use walkabout_api::event::EVENT_VERSION;
pub use walkabout_api::{Event, Subject};

/// Events kept in the database.
const KEEP: u64 = 20_000;

/// The most events `GET /v1/events?tail=N` answers.
pub const TAIL_MAX: u64 = 1000;

/// Publishes events: to the database and to live subscribers.
pub struct Events {
    store: Arc<Store>,
    seq: AtomicU64,
    tx: broadcast::Sender<Event>,
}

impl Events {
    /// Continues the numbering after what `store` holds.
    pub fn new(store: Arc<Store>) -> Events {
        let last = store.last_event_seq(&EVENTS).unwrap_or(0);
        let (tx, _) = broadcast::channel(4096);
        Events { store, seq: AtomicU64::new(last), tx }
    }

    /// Records and publishes one event.
    pub fn emit(&self, subject: Subject, name: &str, message: String, data: serde_json::Value) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let ev = Event { version: EVENT_VERSION, seq, at_ms: crate::now_ms(), subject, name: name.to_string(), message, data };
        tracing::info!(seq, subject = ?ev.subject, name, "{}", ev.message);
        if let Err(e) = self.store.put_event(&EVENTS, seq, &ev, KEEP) {
            tracing::warn!(error = %e, "cannot store event");
        }
        let _ = self.tx.send(ev);
    }

    /// A live subscription (events from now on).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Stored events after `seq`.
    pub fn since(&self, seq: u64) -> Vec<Event> {
        self.store.events_after(&EVENTS, seq).unwrap_or_default()
    }

    /// The last `n` stored events (at most [`TAIL_MAX`]), oldest first.
    pub fn tail(&self, n: u64) -> Vec<Event> {
        let n = n.min(TAIL_MAX);
        let last = self.seq.load(Ordering::SeqCst);
        let mut evs = self.since(last.saturating_sub(n));
        let extra = evs.len().saturating_sub(usize::try_from(n).unwrap_or(usize::MAX));
        evs.drain(..extra);
        evs
    }
}

/// The SSE response for `GET /v1/events?since=N`: stored events after N, then live ones
/// as they happen. Each SSE message has the event's `seq` as its id and its subject as
/// its event type.
pub fn sse(events: &Events, since: Option<u64>) -> axum::response::Response {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use axum::response::IntoResponse;
    let rx = events.subscribe();
    let backlog = since.map(|s| events.since(s)).unwrap_or_default();
    let last = backlog.last().map(|e| e.seq).unwrap_or(since.unwrap_or(0));
    let to_sse = |e: &Event| {
        let kind = serde_json::to_value(e.subject).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        SseEvent::default().id(e.seq.to_string()).event(kind).data(serde_json::to_string(e).unwrap_or_default())
    };
    let backlog: Vec<_> = backlog.iter().map(to_sse).collect();
    let live = futures_util::stream::unfold((rx, last), move |(mut rx, last)| async move {
        loop {
            match rx.recv().await {
                Ok(e) if e.seq <= last => continue,
                Ok(e) => {
                    let kind = serde_json::to_value(e.subject).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
                    let ev = SseEvent::default().id(e.seq.to_string()).event(kind).data(serde_json::to_string(&e).unwrap_or_default());
                    return Some((Ok::<_, std::convert::Infallible>(ev), (rx, e.seq)));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    use futures_util::StreamExt;
    let stream = futures_util::stream::iter(backlog.into_iter().map(Ok::<_, std::convert::Infallible>)).chain(live);
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_is_the_last_n_events_oldest_first() {
        let dir = std::env::temp_dir().join(format!("wa-events-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let store = Arc::new(Store::open(&dir.join("c.redb")).expect("store"));
        let events = Events::new(store);
        for i in 1..=5 {
            events.emit(Subject::Host, "h1", format!("event {i}"), serde_json::Value::Null);
        }

        let last3: Vec<u64> = events.tail(3).iter().map(|e| e.seq).collect();
        let all: Vec<String> = events.tail(50).into_iter().map(|e| e.message).collect();
        let _ = std::fs::remove_dir_all(&dir);

        assert_eq!(last3, [3, 4, 5]);
        assert_eq!(all, ["event 1", "event 2", "event 3", "event 4", "event 5"]);
    }
}
