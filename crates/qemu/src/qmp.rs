//! A small typed async QMP client.
//!
//! QMP is line-delimited JSON over a Unix socket: QEMU greets, the client negotiates
//! capabilities, then sends `{"execute":..,"id":..}` and reads `{"return"|"error":..,"id":..}`
//! replies interleaved with `{"event":..}` messages. One reader task demultiplexes replies
//! (by id) and events (to a broadcast channel), so commands may be issued concurrently.

use crate::QmpError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

/// Default time QEMU gets to answer a command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Qmp::cont`] waits for QEMU to finalize a completed migration.
pub const CONT_FINALIZE_WAIT: Duration = Duration::from_secs(10);

/// An asynchronous event QEMU emitted (e.g. `STOP`, `RESUME`, `MIGRATION`, `SHUTDOWN`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// The event name.
    pub event: String,
    /// Its data, or null.
    #[serde(default)]
    pub data: Value,
    /// QEMU's timestamp: seconds and microseconds.
    #[serde(default)]
    pub timestamp: Value,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

/// A connected QMP session. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<Event>,
    closed: Arc<AtomicBool>,
    closed_notify: Arc<tokio::sync::Notify>,
    timeout: Duration,
    /// QEMU offered out-of-band execution and it was enabled.
    oob: bool,
}

/// Result of `query-status`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct StatusInfo {
    /// Whether guest vCPUs are running.
    pub running: bool,
    /// QEMU's run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub status: String,
}

impl Qmp {
    /// Connects to a QMP socket, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).await.map_err(|source| QmpError::Connect { path: path.to_path_buf(), source })?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(timeout, lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout { command: "greeting".into(), timeout_ms: timeout.as_millis() })??
            .ok_or_else(|| QmpError::Closed { command: "greeting".into() })?;
        let g: Value =
            serde_json::from_str(&greeting).map_err(|e| QmpError::Protocol { context: "greeting".into(), detail: e.to_string() })?;
        if g.get("QMP").is_none() {
            return Err(QmpError::Protocol { context: "greeting".into(), detail: format!("no QMP banner in {greeting}") });
        }
        // Out-of-band execution, where offered: the few commands that must work while
        // QEMU's main loop is blocked (a post-copy destination waiting for a page that
        // will not come) are run by the monitor's own thread (`migrate-pause`,
        // `migrate-recover`).
        let oob = g["QMP"]["capabilities"].as_array().is_some_and(|c| c.iter().any(|x| x == "oob"));
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(1024);
        let closed = Arc::new(AtomicBool::new(false));
        let closed_notify = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(read_loop(lines, pending.clone(), events.clone(), closed.clone(), closed_notify.clone()));
        let qmp = Qmp {
            inner: Arc::new(Inner {
                writer: tokio::sync::Mutex::new(write),
                pending,
                next_id: AtomicU64::new(1),
                events,
                closed,
                closed_notify,
                timeout,
                oob,
            }),
        };
        let caps = oob.then(|| json!({"enable": ["oob"]}));
        qmp.execute_raw("qmp_capabilities", caps).await?;
        Ok(qmp)
    }

    /// Subscribes to QEMU's events from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// True once the connection has closed (QEMU exited or closed the socket).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Resolves when the connection closes.
    pub async fn closed(&self) {
        loop {
            let notified = self.inner.closed_notify.notified();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Runs a command and returns QEMU's raw `return` value.
    pub async fn execute_raw(&self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.execute_raw_timeout(command, args, self.inner.timeout).await
    }

    /// Runs a command with an explicit timeout.
    pub async fn execute_raw_timeout(&self, command: &str, args: Option<Value>, timeout: Duration) -> Result<Value, QmpError> {
        self.send(command, args, timeout, false).await
    }

    /// Runs a command out of band (`exec-oob`) when QEMU offers it, so that it is
    /// served even while QEMU's main loop is blocked; in band otherwise. Only commands
    /// QEMU allows out of band (`migrate-pause`, `migrate-recover`, ...).
    pub async fn execute_oob(&self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.send(command, args, self.inner.timeout, self.inner.oob).await
    }

    /// Whether out-of-band execution is enabled on this session.
    pub fn oob(&self) -> bool {
        self.inner.oob
    }

    async fn send(&self, command: &str, args: Option<Value>, timeout: Duration, oob: bool) -> Result<Value, QmpError> {
        if self.is_closed() {
            return Err(QmpError::Closed { command: command.into() });
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let verb = if oob { "exec-oob" } else { "execute" };
        let mut msg = json!({ "id": id });
        msg[verb] = json!(command);
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(id, tx);
        let mut line = msg.to_string();
        line.push('\n');
        {
            let mut w = self.inner.writer.lock().await;
            if let Err(e) = w.write_all(line.as_bytes()).await {
                lock(&self.inner.pending).remove(&id);
                return Err(e.into());
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                lock(&self.inner.pending).remove(&id);
                Err(QmpError::Timeout { command: command.into(), timeout_ms: timeout.as_millis() })
            }
            Ok(Err(_)) => Err(QmpError::Closed { command: command.into() }),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Refused { command: command.into(), class, desc }),
        }
    }

    /// Runs a command with typed arguments and a typed reply.
    pub async fn execute<A: Serialize, R: DeserializeOwned>(&self, command: &str, args: &A) -> Result<R, QmpError> {
        let a = serde_json::to_value(args).map_err(|e| QmpError::Protocol { context: command.into(), detail: e.to_string() })?;
        let a = if a.is_null() { None } else { Some(a) };
        let v = self.execute_raw(command, a).await?;
        serde_json::from_value(v).map_err(|e| QmpError::Protocol { context: command.into(), detail: e.to_string() })
    }

    /// `query-status`: whether the guest runs, and QEMU's run state.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.execute("query-status", &()).await
    }

    /// `stop`: pauses the guest's vCPUs.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute_raw("stop", None).await.map(drop)
    }

    /// `cont`: resumes the guest's vCPUs.
    ///
    /// Right after an outgoing migration (to a peer or a file) reports `completed`,
    /// QEMU's cleanup may not have run yet and `cont` is refused with "Migration is not
    /// finalized yet"; that refusal is retried for up to [`CONT_FINALIZE_WAIT`].
    pub async fn cont(&self) -> Result<(), QmpError> {
        let deadline = tokio::time::Instant::now() + CONT_FINALIZE_WAIT;
        loop {
            match self.execute_raw("cont", None).await {
                Err(QmpError::Refused { desc, .. }) if desc.contains("not finalized") && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                r => return r.map(drop),
            }
        }
    }

    /// `quit`: asks QEMU to exit at once. A closed connection counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute_raw("quit", None).await {
            Ok(_) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits for the next event named `name`, up to `timeout`.
    pub async fn wait_event(rx: &mut broadcast::Receiver<Event>, name: &str, timeout: Duration) -> Result<Event, QmpError> {
        let fut = async {
            loop {
                match rx.recv().await {
                    Ok(e) if e.event == name => return Ok(e),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return Err(QmpError::Closed { command: format!("event {name}") }),
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| QmpError::Timeout { command: format!("event {name}"), timeout_ms: timeout.as_millis() })?
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned map only means another task panicked mid-insert; the map is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    closed: Arc<AtomicBool>,
    closed_notify: Arc<tokio::sync::Notify>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        let v: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(%line, error = %e, "ignoring malformed QMP line");
                continue;
            }
        };
        if v.get("event").is_some_and(|e| e == "COMMAND_DROPPED") {
            // With out-of-band enabled QEMU may drop an in-band command when its queue
            // is full: its reply will never come, so say so now.
            if let Some(id) = v["data"]["id"].as_u64() {
                if let Some(tx) = lock(&pending).remove(&id) {
                    let why = v["data"]["reason"].as_str().unwrap_or("queue full").to_string();
                    let _ = tx.send(Err(("CommandDropped".into(), format!("QEMU dropped the command: {why}"))));
                }
            }
            continue;
        }
        if v.get("event").is_some() {
            if let Ok(ev) = serde_json::from_value::<Event>(v) {
                tracing::debug!(event = %ev.event, "QMP event");
                let _ = events.send(ev);
            }
            continue;
        }
        let Some(id) = v.get("id").and_then(Value::as_u64) else { continue };
        let Some(tx) = lock(&pending).remove(&id) else { continue };
        let reply = if let Some(r) = v.get("return") {
            Ok(r.clone())
        } else if let Some(e) = v.get("error") {
            let class = e.get("class").and_then(Value::as_str).unwrap_or("Unknown").to_string();
            let desc = e.get("desc").and_then(Value::as_str).unwrap_or("").to_string();
            Err((class, desc))
        } else {
            Err(("Protocol".into(), format!("reply without return or error: {line}")))
        };
        let _ = tx.send(reply);
    }
    closed.store(true, Ordering::SeqCst);
    lock(&pending).clear();
    closed_notify.notify_waiters();
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted fake QEMU: greets, then answers each command per `reply`.
    async fn fake_qemu(path: std::path::PathBuf, reply: fn(&Value) -> Vec<Value>) {
        fake_qemu_offering(path, &[], reply).await
    }

    /// A scripted fake QEMU offering `caps` in its greeting.
    async fn fake_qemu_offering(path: std::path::PathBuf, caps: &[&str], reply: fn(&Value) -> Vec<Value>) {
        let listener = UnixListener::bind(&path).expect("bind");
        let (s, _) = listener.accept().await.expect("accept");
        let (r, mut w) = s.into_split();
        let greeting = json!({"QMP": {"version": {}, "capabilities": caps}}).to_string() + "\n";
        w.write_all(greeting.as_bytes()).await.expect("greet");
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let req: Value = serde_json::from_str(&l).expect("json");
            for out in reply(&req) {
                w.write_all((out.to_string() + "\n").as_bytes()).await.expect("write");
            }
        }
    }

    fn sock(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("wa-qmp-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[tokio::test]
    async fn refused_command_carries_qemu_class_and_text() {
        let p = sock("refused");
        tokio::spawn(fake_qemu(p.clone(), |req| {
            let id = req["id"].clone();
            if req["execute"] == "qmp_capabilities" {
                vec![json!({"return": {}, "id": id})]
            } else {
                vec![json!({"error": {"class": "DeviceNotFound", "desc": "no such thing"}, "id": id})]
            }
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let q = Qmp::connect(&p, DEFAULT_TIMEOUT).await.expect("connect");
        let err = q.stop().await.expect_err("refused");
        assert_eq!(err.to_string(), "QEMU refused `stop`: DeviceNotFound: no such thing");
    }

    #[tokio::test]
    async fn cont_waits_while_qemu_finalizes_a_completed_migration() {
        static REFUSALS: AtomicU64 = AtomicU64::new(0);
        let p = sock("finalize");
        tokio::spawn(fake_qemu(p.clone(), |req| {
            let id = req["id"].clone();
            if req["execute"] == "cont" && REFUSALS.fetch_add(1, Ordering::SeqCst) < 3 {
                vec![json!({"error": {"class": "GenericError", "desc": "Migration is not finalized yet"}, "id": id})]
            } else {
                vec![json!({"return": {}, "id": id})]
            }
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let q = Qmp::connect(&p, DEFAULT_TIMEOUT).await.expect("connect");
        q.cont().await.expect("cont once finalized");
        assert_eq!(REFUSALS.load(Ordering::SeqCst), 4, "three refusals then the accepted cont");
    }

    #[tokio::test]
    async fn events_are_delivered_between_replies() {
        let p = sock("events");
        tokio::spawn(fake_qemu(p.clone(), |req| {
            let id = req["id"].clone();
            let mut out = vec![];
            if req["execute"] == "stop" {
                out.push(json!({"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}));
            }
            out.push(json!({"return": {}, "id": id}));
            out
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let q = Qmp::connect(&p, DEFAULT_TIMEOUT).await.expect("connect");
        let mut rx = q.events();
        q.stop().await.expect("stop");
        let ev = Qmp::wait_event(&mut rx, "STOP", Duration::from_secs(1)).await.expect("event");
        assert_eq!(ev.event, "STOP");
    }

    #[tokio::test]
    async fn out_of_band_is_enabled_when_offered_and_used_for_oob_commands() {
        let p = sock("oob");
        tokio::spawn(fake_qemu_offering(p.clone(), &["oob"], |req| {
            let id = req["id"].clone();
            match (req["execute"].as_str(), req["exec-oob"].as_str()) {
                (Some("qmp_capabilities"), _) if req["arguments"]["enable"] == json!(["oob"]) => vec![json!({"return": {}, "id": id})],
                (_, Some("migrate-pause")) => vec![json!({"return": {"oob": true}, "id": id})],
                _ => vec![json!({"error": {"class": "GenericError", "desc": format!("unexpected {req}")}, "id": id})],
            }
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let q = Qmp::connect(&p, DEFAULT_TIMEOUT).await.expect("connect");

        let reply = q.execute_oob("migrate-pause", None).await.expect("oob command");

        assert!(q.oob());
        assert_eq!(reply, json!({"oob": true}));
    }

    #[tokio::test]
    async fn a_command_qemu_drops_fails_at_once_with_the_reason() {
        let p = sock("dropped");
        tokio::spawn(fake_qemu_offering(p.clone(), &["oob"], |req| {
            let id = req["id"].clone();
            if req["execute"] == "qmp_capabilities" {
                vec![json!({"return": {}, "id": id})]
            } else {
                vec![
                    json!({"event": "COMMAND_DROPPED", "data": {"id": id, "reason": "queue-full"}, "timestamp": {"seconds": 1, "microseconds": 2}}),
                ]
            }
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let q = Qmp::connect(&p, Duration::from_secs(30)).await.expect("connect");

        let err = q.query_status().await.expect_err("dropped");

        assert!(err.to_string().contains("queue-full"), "{err}");
    }

    #[tokio::test]
    async fn silent_qemu_times_out_with_command_name() {
        let p = sock("silent");
        tokio::spawn(fake_qemu(p.clone(), |req| {
            if req["execute"] == "qmp_capabilities" {
                vec![json!({"return": {}, "id": req["id"].clone()})]
            } else {
                vec![]
            }
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let q = Qmp::connect(&p, Duration::from_millis(200)).await.expect("connect");
        let err = q.query_status().await.expect_err("timeout");
        assert!(matches!(err, QmpError::Timeout { ref command, .. } if command == "query-status"), "{err}");
    }
}
