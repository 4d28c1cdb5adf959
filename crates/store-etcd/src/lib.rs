//! The controller's store in etcd, for several controllers sharing one cluster: the same
//! tables, counters and logs as the embedded redb file (`walkabout-store`'s [`Backend`]),
//! leader election with a lease, and writes fenced by the leader's term.
//!
//! # Keys
//! Everything lives under one prefix (default `/walkabout/`):
//!
//! | key | what |
//! |---|---|
//! | `PREFIX t/TABLE/KEY` | a record (the bytes `walkabout-store` encodes: tag, version, JSON) |
//! | `PREFIX c/NAME` | a counter, as decimal text |
//! | `PREFIX l/LOG/SEQ` | a log entry; `SEQ` zero-padded to 20 digits so keys sort by number |
//! | `PREFIX leader` | the leader's URL, bound to its lease |
//!
//! # Leadership and epochs
//! A controller becomes leader by creating `PREFIX leader` bound to a lease it keeps
//! alive (a transaction that succeeds only if the key does not exist). The key's create
//! revision is the leader's **epoch**: etcd revisions only grow, so every later leader has
//! a higher epoch than every earlier one. When the leader dies its lease expires (after
//! its TTL), the key goes, and the next controller to campaign wins.
//!
//! A store opened for a [`Leadership`] fences every write: each is a transaction that
//! applies only while the leader key still has the leader's create revision. A deposed
//! leader that has not noticed yet (paused, cut off) cannot write: it gets
//! [`StoreError::Fenced`]. Agents fence what it asks of them the same way, by the epoch
//! each request carries.
//!
//! # Threads
//! [`Backend`] is synchronous, like redb. The etcd client runs on a small runtime of its
//! own (one thread); a synchronous call hands its request to that runtime and waits for
//! the answer, so it may be made from anywhere, inside another runtime's task too.

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use walkabout_store::{Backend, Store, StoreError};

/// The default prefix of every key.
pub const DEFAULT_PREFIX: &str = "/walkabout/";
/// How long one etcd request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys read per request when listing a table or a log.
const PAGE: i64 = 500;

/// Where etcd is and which part of its keyspace is ours.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client endpoints, `http://HOST:PORT` (or `HOST:PORT`).
    pub endpoints: Vec<String>,
    /// The prefix of every key (ends with `/`).
    pub prefix: String,
}

impl EtcdConfig {
    /// Parses `etcd://HOST:PORT,HOST:PORT[/PREFIX]` (the controller's `--store`).
    pub fn parse(url: &str) -> Result<EtcdConfig, String> {
        let rest = url.strip_prefix("etcd://").ok_or_else(|| format!("store {url:?} is not etcd://HOST:PORT,..."))?;
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) if !p.is_empty() => (h, format!("/{}/", p.trim_matches('/'))),
            Some((h, _)) => (h, DEFAULT_PREFIX.to_string()),
            None => (rest, DEFAULT_PREFIX.to_string()),
        };
        let endpoints: Vec<String> = hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("http://{h}")).collect();
        if endpoints.is_empty() || endpoints.iter().any(|e| !e[7..].contains(':')) {
            return Err(format!("store {url:?}: expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"));
        }
        Ok(EtcdConfig { endpoints, prefix })
    }

    /// The URL form, for messages: `etcd://HOST:PORT,...`.
    pub fn describe(&self) -> String {
        let hosts: Vec<&str> = self.endpoints.iter().map(|e| e.trim_start_matches("http://")).collect();
        format!("etcd://{}{}", hosts.join(","), self.prefix.trim_end_matches('/'))
    }
}

/// A connection to etcd on a runtime of its own, shared by the store and the election.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    config: EtcdConfig,
    client: Client,
    rt: tokio::runtime::Handle,
    /// Dropped with the last handle: ends the runtime's thread.
    _stop: std::sync::mpsc::SyncSender<()>,
}

/// A term as leader: its epoch, and a signal that turns `true` once the lease is lost.
#[derive(Clone)]
pub struct Leadership {
    /// The leader's epoch: the create revision of the leader key.
    pub epoch: u64,
    lease: i64,
    lost: watch::Receiver<bool>,
    /// When the last renewal that etcd granted was sent: the lease holds until `ttl`
    /// after it at least.
    renewed: Arc<Mutex<Instant>>,
    ttl: Duration,
}

impl Leadership {
    /// Resolves once the lease is lost (expired, revoked, or etcd unreachable for its TTL).
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether the lease is known lost.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Whether this process may still act as leader now: its lease is not known lost
    /// and a renewal etcd granted was sent less than a TTL ago. A process that was
    /// paused (SIGSTOP, a VM stall) past its TTL is no leader on waking, before its
    /// keep-alive task has run to notice: the monotonic clock ran on meanwhile.
    pub fn is_current(&self) -> bool {
        let renewed = *self.renewed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        !self.is_lost() && renewed.elapsed() < self.ttl
    }
}

/// Who leads now, as the leader key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The leader's advertised URL.
    pub url: String,
    /// Its epoch.
    pub epoch: u64,
}

/// Errors of the connection and the election (the store's are [`StoreError`]s).
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd could not be reached or refused.
    #[error("{store}: cannot {action}: {detail}")]
    Failed {
        /// The store.
        store: String,
        /// What was being done.
        action: String,
        /// What etcd or the transport said.
        detail: String,
    },
}

impl Etcd {
    /// Connects to etcd (waits up to [`REQUEST_TIMEOUT`] for an endpoint to answer).
    pub fn connect(config: EtcdConfig) -> Result<Etcd, EtcdError> {
        let failed = |detail: String| EtcdError::Failed { store: config.describe(), action: "connect".into(), detail };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| failed(format!("cannot start its runtime: {e}")))?;
        let handle = rt.handle().clone();
        let (stop, stopped) = std::sync::mpsc::sync_channel::<()>(0);
        std::thread::Builder::new()
            .name("etcd-runtime".into())
            .spawn(move || {
                // The runtime lives until the last handle drops its sender; it is dropped
                // here, on a plain thread, where that is allowed.
                let _ = stopped.recv();
                rt.shutdown_background();
            })
            .map_err(|e| failed(format!("cannot start its thread: {e}")))?;
        let endpoints = config.endpoints.clone();
        let client = run_on(&handle, async move {
            let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(REQUEST_TIMEOUT);
            let mut client = Client::connect(endpoints, Some(opts)).await?;
            // The connection is lazy: ask once so a wrong address fails here.
            client.status().await?;
            Ok::<_, etcd_client::Error>(client)
        })
        .map_err(failed)?
        .map_err(|e| failed(e.to_string()))?;
        Ok(Etcd { inner: Arc::new(Inner { config, client, rt: handle, _stop: stop }) })
    }

    /// Where this connection goes, for messages.
    pub fn describe(&self) -> String {
        format!("etcd {}", self.inner.config.describe())
    }

    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.inner.config.prefix).into_bytes()
    }

    fn leader_key(&self) -> Vec<u8> {
        self.key("leader")
    }

    /// Runs `f` with a client on the connection's runtime and waits for it, from any
    /// thread (a task of another runtime too).
    fn block<T: Send + 'static, F>(&self, f: impl FnOnce(Client) -> F) -> Result<T, String>
    where
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let fut = f(self.inner.client.clone());
        run_on(&self.inner.rt, async move { tokio::time::timeout(REQUEST_TIMEOUT, fut).await })?
            .map_err(|_| format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())
    }

    /// Runs `f` with a client on the connection's runtime, awaited from an async caller.
    async fn call<T: Send + 'static, F>(&self, f: impl FnOnce(Client) -> F) -> Result<T, String>
    where
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let fut = f(self.inner.client.clone());
        self.inner
            .rt
            .spawn(async move { tokio::time::timeout(REQUEST_TIMEOUT, fut).await })
            .await
            .map_err(|e| format!("etcd task failed: {e}"))?
            .map_err(|_| format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())
    }

    fn failed(&self, action: &str, detail: String) -> EtcdError {
        EtcdError::Failed { store: self.describe(), action: action.into(), detail }
    }

    /// The leader now, if there is one.
    pub async fn leader(&self) -> Result<Option<Leader>, EtcdError> {
        let key = self.leader_key();
        let resp = self.call(|mut c| async move { c.get(key, None).await }).await.map_err(|e| self.failed("read the leader key", e))?;
        Ok(resp.kvs().first().map(leader_of))
    }

    /// Campaigns until this process leads: takes a lease of `ttl`, keeps it alive, and
    /// creates the leader key with `url` as soon as no one holds it. Returns the term;
    /// its [`Leadership::lost`] resolves when the lease is lost.
    pub async fn campaign(&self, url: &str, ttl: Duration) -> Result<Leadership, EtcdError> {
        let ttl_s = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        loop {
            // The lease runs from etcd's grant, which comes after this instant.
            let asked = Instant::now();
            let grant = self.call(move |mut c| async move { c.lease_grant(ttl_s, None).await }).await;
            let lease = grant.map_err(|e| self.failed("take a lease", e))?.id();
            let renewed = Arc::new(Mutex::new(asked));
            let lost = self.keep_alive(lease, ttl, renewed.clone());
            loop {
                if *lost.borrow() {
                    break; // the lease lapsed while waiting: take a new one
                }
                let (key, value) = (self.leader_key(), url.to_string());
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), value, Some(PutOptions::new().with_lease(lease)))])
                    .or_else([TxnOp::get(key, None)]);
                match self.call(|mut c| async move { c.txn(txn).await }).await {
                    Ok(resp) if resp.succeeded() => {
                        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                        let epoch = u64::try_from(revision).unwrap_or(0);
                        tracing::info!(epoch, lease, "this controller leads");
                        return Ok(Leadership { epoch, lease, lost, renewed, ttl });
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "campaign: etcd did not answer; retrying"),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }

    /// Keeps `lease` alive every third of `ttl` on the connection's runtime, setting
    /// `renewed` to when each renewal etcd granted was sent; the returned signal turns
    /// `true` once etcd says the lease is gone, or once no renewal succeeded for a
    /// whole `ttl` since `renewed`.
    fn keep_alive(&self, lease: i64, ttl: Duration, renewed: Arc<Mutex<Instant>>) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        let client = self.inner.client.clone();
        self.inner.rt.spawn(async move {
            let last_ok = || *renewed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut stream = None;
            loop {
                if tx.is_closed() {
                    return; // nobody holds the term any more
                }
                if last_ok().elapsed() >= ttl {
                    tracing::warn!(lease, "lease not renewed for its whole TTL: leadership lost");
                    let _ = tx.send(true);
                    return;
                }
                if stream.is_none() {
                    let mut c = client.clone();
                    stream = tokio::time::timeout(ttl / 3, c.lease_keep_alive(lease)).await.ok().and_then(Result::ok);
                }
                if let Some((keeper, answers)) = stream.as_mut() {
                    // Counted from the sending: etcd extends the lease when it gets the
                    // request, so its TTL runs out no later than `ttl` after this.
                    let sent = Instant::now();
                    let answer = tokio::time::timeout(ttl / 3, async {
                        keeper.keep_alive().await?;
                        answers.message().await
                    })
                    .await;
                    match answer {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => *renewed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = sent,
                        Ok(Ok(Some(_))) => {
                            tracing::warn!(lease, "etcd says the lease expired: leadership lost");
                            let _ = tx.send(true);
                            return;
                        }
                        _ => stream = None,
                    }
                }
                tokio::time::sleep(ttl / 3).await;
            }
        });
        rx
    }

    /// Gives up a term: revokes its lease, so the next leader need not wait for it to
    /// expire.
    pub async fn resign(&self, term: &Leadership) {
        let lease = term.lease;
        if let Err(e) = self.call(move |mut c| async move { c.lease_revoke(lease).await }).await {
            tracing::warn!(error = %e, "cannot revoke the leader's lease; it expires by itself");
        }
    }

    /// A [`Store`] over this connection. With a `term`, every write is fenced by it:
    /// refused with [`StoreError::Fenced`] once another controller leads.
    pub fn store(&self, term: Option<&Leadership>) -> Store {
        Store::over(Box::new(EtcdBackend { etcd: self.clone(), fence: term.map(|t| t.epoch), fenced: Mutex::new(false) }))
    }
}

fn leader_of(kv: &KeyValue) -> Leader {
    Leader { url: String::from_utf8_lossy(kv.value()).into_owned(), epoch: u64::try_from(kv.create_revision()).unwrap_or(0) }
}

/// Runs `fut` on `rt` and waits for its output on this thread.
fn run_on<T: Send + 'static>(rt: &tokio::runtime::Handle, fut: impl Future<Output = T> + Send + 'static) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| "the etcd client's runtime stopped".to_string())
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A key and its value, as etcd holds them.
type KeyBytes = (Vec<u8>, Vec<u8>);

/// The store in etcd: a [`Backend`] whose writes are fenced by a leader's epoch when it
/// has one.
struct EtcdBackend {
    etcd: Etcd,
    /// The epoch (the leader key's create revision) writes are fenced by.
    fence: Option<u64>,
    /// Set once a fenced write was refused: every later write is refused at once.
    fenced: Mutex<bool>,
}

impl EtcdBackend {
    fn remote(&self, action: impl Into<String>, detail: String) -> StoreError {
        StoreError::Remote { store: self.etcd.describe(), action: action.into(), detail }
    }

    fn fenced_error(&self, action: impl Into<String>) -> StoreError {
        StoreError::Fenced { store: self.etcd.describe(), action: action.into(), epoch: self.fence.unwrap_or(0) }
    }

    /// The compare that holds while this store's leader still leads.
    fn guard(&self) -> Vec<Compare> {
        match self.fence {
            Some(epoch) => {
                vec![Compare::create_revision(self.etcd.leader_key(), CompareOp::Equal, i64::try_from(epoch).unwrap_or(i64::MAX))]
            }
            None => vec![],
        }
    }

    /// Applies `ops` if `compares` and the fence hold. `Ok(false)` when one of
    /// `compares` failed (the fence held); [`StoreError::Fenced`] when the fence failed.
    fn write(&self, action: &str, mut compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<bool, StoreError> {
        if *self.fenced.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            return Err(self.fenced_error(action));
        }
        let own = !compares.is_empty();
        compares.extend(self.guard());
        let txn = Txn::new().when(compares).and_then(ops);
        let resp = self.etcd.block(|mut c| async move { c.txn(txn).await }).map_err(|e| self.remote(action, e))?;
        if resp.succeeded() {
            return Ok(true);
        }
        if self.fence.is_some() && !self.still_leads(action)? {
            *self.fenced.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
            return Err(self.fenced_error(action));
        }
        if !own {
            return Err(self.remote(action, "the transaction failed without a reason".into()));
        }
        Ok(false)
    }

    fn still_leads(&self, action: &str) -> Result<bool, StoreError> {
        let key = self.etcd.leader_key();
        let resp = self.etcd.block(|mut c| async move { c.get(key, None).await }).map_err(|e| self.remote(action, e))?;
        let now = resp.kvs().first().map(|kv| u64::try_from(kv.create_revision()).unwrap_or(0));
        Ok(now.is_some() && now == self.fence)
    }

    /// Every key/value in `[from, end)`, in key order, read a page at a time.
    fn range(&self, action: &str, mut from: Vec<u8>, end: Vec<u8>) -> Result<Vec<KeyBytes>, StoreError> {
        let mut out = Vec::new();
        loop {
            let (start, stop) = (from.clone(), end.clone());
            let resp = self
                .etcd
                .block(|mut c| async move { c.get(start, Some(GetOptions::new().with_range(stop).with_limit(PAGE))).await })
                .map_err(|e| self.remote(action, e))?;
            let kvs = resp.kvs();
            out.extend(kvs.iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())));
            match kvs.last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    fn read_counter(&self, action: &str, key: &[u8]) -> Result<(u64, i64), StoreError> {
        let k = key.to_vec();
        let resp = self.etcd.block(|mut c| async move { c.get(k, None).await }).map_err(|e| self.remote(action, e))?;
        match resp.kvs().first() {
            None => Ok((0, 0)),
            Some(kv) => {
                let text = String::from_utf8_lossy(kv.value());
                let n = text.trim().parse().map_err(|_| self.remote(action, format!("the counter holds {text:?}, not a number")))?;
                Ok((n, kv.mod_revision()))
            }
        }
    }

    /// Sets a counter to `f(current)` with compare-and-swap, retrying on races.
    fn update_counter(&self, counter: &str, action: &str, f: impl Fn(u64) -> Option<u64>) -> Result<u64, StoreError> {
        let key = self.etcd.key(&format!("c/{counter}"));
        for _ in 0..100 {
            let (now, revision) = self.read_counter(action, &key)?;
            let Some(next) = f(now) else { return Ok(now) };
            let cmp = Compare::mod_revision(key.clone(), CompareOp::Equal, revision);
            if self.write(action, vec![cmp], vec![TxnOp::put(key.clone(), next.to_string(), None)])? {
                return Ok(next);
            }
        }
        Err(self.remote(action, "lost the race for the counter 100 times in a row".into()))
    }

    fn log_key(&self, log: &str, seq: u64) -> Vec<u8> {
        self.etcd.key(&format!("l/{log}/{seq:020}"))
    }
}

impl Backend for EtcdBackend {
    fn describe(&self) -> String {
        self.etcd.describe()
    }

    fn put(&self, table: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let action = format!("write record `{key}` of table `{table}`");
        self.write(&action, vec![], vec![TxnOp::put(self.etcd.key(&format!("t/{table}/{key}")), value.to_vec(), None)]).map(|_| ())
    }

    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let k = self.etcd.key(&format!("t/{table}/{key}"));
        let resp = self
            .etcd
            .block(|mut c| async move { c.get(k, None).await })
            .map_err(|e| self.remote(format!("read record `{key}` of table `{table}`"), e))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    fn delete(&self, table: &str, key: &str) -> Result<(), StoreError> {
        let action = format!("delete record `{key}` of table `{table}`");
        self.write(&action, vec![], vec![TxnOp::delete(self.etcd.key(&format!("t/{table}/{key}")), None)]).map(|_| ())
    }

    fn list(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = self.etcd.key(&format!("t/{table}/"));
        let end = prefix_end(&prefix);
        let kvs = self.range(&format!("list table `{table}`"), prefix.clone(), end)?;
        Ok(kvs.into_iter().map(|(k, v)| (String::from_utf8_lossy(&k[prefix.len()..]).into_owned(), v)).collect())
    }

    fn next(&self, counter: &str) -> Result<u64, StoreError> {
        self.update_counter(counter, &format!("advance counter `{counter}`"), |n| Some(n + 1))
    }

    fn raise(&self, counter: &str, at_least: u64) -> Result<u64, StoreError> {
        self.update_counter(counter, &format!("raise counter `{counter}` to {at_least}"), |n| (at_least > n).then_some(at_least))
    }

    fn counter(&self, counter: &str) -> Result<u64, StoreError> {
        self.read_counter(&format!("read counter `{counter}`"), &self.etcd.key(&format!("c/{counter}"))).map(|(n, _)| n)
    }

    fn append(&self, log: &str, seq: u64, value: &[u8], keep: u64) -> Result<(), StoreError> {
        let mut ops = vec![TxnOp::put(self.log_key(log, seq), value.to_vec(), None)];
        if let Some(oldest_kept) = seq.checked_sub(keep) {
            let first = self.etcd.key(&format!("l/{log}/"));
            ops.push(TxnOp::delete(first, Some(DeleteOptions::new().with_range(self.log_key(log, oldest_kept + 1)))));
        }
        self.write(&format!("append event {seq} to log `{log}`"), vec![], ops).map(|_| ())
    }

    fn after(&self, log: &str, after: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let action = format!("read log `{log}`");
        let end = prefix_end(&self.etcd.key(&format!("l/{log}/")));
        let kvs = self.range(&action, self.log_key(log, after.saturating_add(1)), end)?;
        kvs.into_iter().map(|(k, v)| Ok((self.seq_of(&action, &k)?, v))).collect()
    }

    fn last_seq(&self, log: &str) -> Result<u64, StoreError> {
        let action = format!("read log `{log}`");
        let prefix = self.etcd.key(&format!("l/{log}/"));
        let opts = GetOptions::new().with_prefix().with_sort(SortTarget::Key, SortOrder::Descend).with_limit(1).with_keys_only();
        let resp = self.etcd.block(|mut c| async move { c.get(prefix, Some(opts)).await }).map_err(|e| self.remote(&action, e))?;
        match resp.kvs().first() {
            Some(kv) => self.seq_of(&action, kv.key()),
            None => Ok(0),
        }
    }
}

impl EtcdBackend {
    fn seq_of(&self, action: &str, key: &[u8]) -> Result<u64, StoreError> {
        let text = String::from_utf8_lossy(key);
        text.rsplit('/')
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.remote(action, format!("log key {text:?} does not end in a sequence number")))
    }
}

#[cfg(test)]
mod tests;
