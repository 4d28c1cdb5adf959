//! Free will: the host end of a VM's `org.walkabout.0` port.
//!
//! QEMU listens on `<run_dir>/will.sock` for each VM created with free will; this module
//! connects to it (again after every restart of the agent, and on the destination of a
//! migration, whose QEMU has a socket of its own), reads the guest's requests, one a line
//! (`walk any`, `walk least-loaded`, `walk HOST`), and queues them per VM until the
//! controller answers (`GET /v1/will`, `POST /v1/vms/{name}/will/answer`). An answer is
//! written back on the port, a line, wherever the VM runs by then: after a move, the
//! destination's agent writes it. A line that is not a request is refused at once.

use crate::error::AgentError;
use crate::vms::{lock, now_ms, Agent};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use walkabout_api::{VmState, WillAnswer, WillAsk, WillRequest};

/// How often the agent looks for free-will ports to connect to.
const SCAN: Duration = Duration::from_millis(300);
/// Requests kept per VM; older ones are dropped.
const QUEUE: usize = 8;
/// The longest line a guest may write.
const MAX_LINE: u64 = 256;

/// One connection to a VM's port.
struct Port {
    /// Which connection (a reader that ends removes only its own).
    conn: u64,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
}

/// The agent's free-will ports and the requests awaiting an answer.
#[derive(Default)]
pub(crate) struct Will {
    ports: Mutex<BTreeMap<String, Port>>,
    queues: Mutex<BTreeMap<String, VecDeque<WillRequest>>>,
    next: AtomicU64,
}

impl Will {
    fn queue(&self, req: WillRequest) {
        let mut q = lock(&self.queues);
        let vq = q.entry(req.vm.clone()).or_default();
        if vq.len() >= QUEUE {
            vq.pop_front();
        }
        vq.push_back(req);
    }
}

impl Agent {
    /// The requests of this host's guests awaiting an answer, oldest first.
    pub fn will_requests(&self) -> Vec<WillRequest> {
        let mut all: Vec<WillRequest> = lock(&self.inner.will.queues).values().flatten().cloned().collect();
        all.sort_by_key(|r| (r.asked_ms, r.id));
        all
    }

    /// Writes `answer` on VM `name`'s port and drops the request it answers.
    pub async fn will_answer(&self, name: &str, answer: WillAnswer) -> Result<WillAnswer, AgentError> {
        let (free_will, state, socket) = {
            let vm = self.vm(name)?;
            let vm = vm.lock().await;
            (vm.record.spec.free_will, vm.record.state, vm.record.run_dir.join("will.sock"))
        };
        if !free_will {
            return Err(AgentError::InvalidRequest { reason: format!("VM {name} has no free will (created without --free-will)") });
        }
        if !state.is_active() || !state.is_owned() {
            return Err(AgentError::InvalidState { vm: name.into(), op: "answer the free will of", state });
        }
        if let Some(id) = answer.id {
            if let Some(q) = lock(&self.inner.will.queues).get_mut(name) {
                q.retain(|r| r.id != id);
            }
        }
        let line = format!("{}\n", answer.answer.replace(['\n', '\r'], " "));
        // A VM that just arrived may not be connected yet: connect now.
        let writer = match self.port_writer(name) {
            Some(w) => w,
            None => self.connect(name, &socket).await.map_err(|e| io_error(name, &socket, &e))?,
        };
        writer.lock().await.write_all(line.as_bytes()).await.map_err(|e| io_error(name, &socket, &e))?;
        tracing::info!(vm = name, answer = %answer.answer, "free will answered");
        Ok(answer)
    }

    fn port_writer(&self, name: &str) -> Option<Arc<tokio::sync::Mutex<OwnedWriteHalf>>> {
        lock(&self.inner.will.ports).get(name).map(|p| p.writer.clone())
    }

    /// Connects to VM `name`'s port at `socket` and starts reading its requests.
    async fn connect(&self, name: &str, socket: &Path) -> std::io::Result<Arc<tokio::sync::Mutex<OwnedWriteHalf>>> {
        let stream = UnixStream::connect(socket).await?;
        let (read, write) = stream.into_split();
        let writer = Arc::new(tokio::sync::Mutex::new(write));
        let conn = self.inner.will.next.fetch_add(1, Ordering::SeqCst);
        lock(&self.inner.will.ports).insert(name.to_string(), Port { conn, writer: writer.clone() });
        tracing::debug!(vm = name, socket = %socket.display(), "free-will port connected");
        let agent = Arc::downgrade(&self.inner);
        let (vm, w) = (name.to_string(), writer.clone());
        tokio::spawn(async move { read_requests(agent, vm, conn, BufReader::new(read), w).await });
        Ok(writer)
    }

    /// The free-will VMs that run here and whose port is not connected: name, socket.
    async fn unconnected(&self) -> Vec<(String, PathBuf)> {
        let mut out = vec![];
        let connected: Vec<String> = lock(&self.inner.will.ports).keys().cloned().collect();
        let mut present = vec![];
        for (name, vm) in self.vm_handles() {
            present.push(name.clone());
            // A VM busy (booting, migrating) is looked at again on the next scan.
            let Ok(vm) = vm.try_lock() else { continue };
            let r = &vm.record;
            let runs = matches!(r.state, VmState::Running | VmState::Paused | VmState::Migrating);
            if r.spec.free_will && runs && !connected.contains(&name) {
                out.push((name, r.run_dir.join("will.sock")));
            }
        }
        // VMs gone from here (moved away, deleted) take their queue with them.
        lock(&self.inner.will.queues).retain(|vm, _| present.contains(vm));
        out
    }
}

fn io_error(vm: &str, socket: &Path, e: &std::io::Error) -> AgentError {
    AgentError::InvalidRequest { reason: format!("cannot reach VM {vm}'s free-will port {}: {e}", socket.display()) }
}

/// Keeps every free-will VM of the agent connected, until the agent is dropped.
pub(crate) fn spawn(agent: &Agent) {
    let inner = Arc::downgrade(&agent.inner);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(SCAN).await;
            let Some(inner) = inner.upgrade() else { return };
            let agent = Agent { inner };
            for (name, socket) in agent.unconnected().await {
                if let Err(e) = agent.connect(&name, &socket).await {
                    tracing::debug!(vm = name, socket = %socket.display(), error = %e, "free-will port not connected yet");
                }
            }
        }
    });
}

/// Reads VM `vm`'s requests from connection `conn` until QEMU closes it.
async fn read_requests(
    agent: Weak<crate::vms::Inner>,
    vm: String,
    conn: u64,
    mut read: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
) {
    let mut line = String::new();
    loop {
        line.clear();
        let n = match (&mut read).take(MAX_LINE).read_line(&mut line).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(vm, error = %e, "free-will port read failed");
                0
            }
        };
        let Some(inner) = agent.upgrade() else { return };
        if n == 0 {
            let mut ports = lock(&inner.will.ports);
            if ports.get(&vm).is_some_and(|p| p.conn == conn) {
                ports.remove(&vm);
            }
            tracing::debug!(vm, "free-will port closed");
            return;
        }
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        match text.parse::<WillAsk>() {
            Ok(ask) => {
                let id = inner.will.next.fetch_add(1, Ordering::SeqCst);
                tracing::info!(vm, id, ask = %ask, "free will: the guest asks");
                inner.will.queue(WillRequest { vm: vm.clone(), id, ask, asked_ms: now_ms() });
            }
            Err(why) => {
                let reply = format!("refused: {why}\n");
                let _ = writer.lock().await.write_all(reply.as_bytes()).await;
            }
        }
    }
}
