//! Property tests of the QMP client's decoding (issue 11, "inputs fuzzed"): whatever
//! QEMU writes on its socket (garbage, truncated lines, JSON of any shape, events of any
//! shape) the client neither panics nor hangs; a command gets exactly its own reply or a
//! typed error; well-formed generated replies and events decode to what was generated.
//! Each case runs against a scripted fake QEMU on a Unix socket (no QEMU).

use super::*;
use proptest::prelude::*;
use tokio::net::UnixListener;

/// What the fake QEMU writes for the test's one command: `before` lines, then the
/// reply (`reply` with `"id"` set to the command's id), unless `reply` is `None`.
#[derive(Debug, Clone)]
struct Script {
    before: Vec<Vec<u8>>,
    reply: Option<Value>,
}

/// Starts a fake QEMU on a fresh socket that answers `qmp_capabilities`, then plays
/// `script` for the next command; returns the socket.
async fn fake(tag: &str, script: Script) -> std::path::PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("wa-qmp-fuzz-{}-{tag}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
    tokio::spawn(async move {
        let Ok((s, _)) = listener.accept().await else { return };
        let (r, mut w) = s.into_split();
        let greeting = json!({"QMP": {"version": {}, "capabilities": []}}).to_string() + "\n";
        let _ = w.write_all(greeting.as_bytes()).await;
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let Ok(req) = serde_json::from_str::<Value>(&l) else { return };
            let id = req["id"].clone();
            let mut out = Vec::new();
            if req["execute"] == "qmp_capabilities" {
                out = (json!({"return": {}, "id": id}).to_string() + "\n").into_bytes();
            } else {
                for b in &script.before {
                    out.extend_from_slice(b);
                    out.push(b'\n');
                }
                if let Some(mut reply) = script.reply.clone() {
                    reply["id"] = id;
                    out.extend_from_slice((reply.to_string() + "\n").as_bytes());
                }
            }
            if w.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    path
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("runtime: {e}"))
}

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        prop_oneof![Just("return"), Just("error"), Just("event"), Just("id"), Just("class"), Just("desc"), Just("running")]
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        let key = prop_oneof![
            "[a-z-]{0,8}",
            Just("return".to_string()),
            Just("error".to_string()),
            Just("event".to_string()),
            Just("data".to_string()),
            Just("class".to_string()),
            Just("desc".to_string()),
            Just("timestamp".to_string()),
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(key, inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A line that must not be taken for the reply to the pending command: garbage text,
/// a truncated reply, or JSON that is not a reply to that id (events of any shape
/// included, but not `COMMAND_DROPPED`, which would rightly fail the command).
fn noise_line() -> impl Strategy<Value = String> {
    prop_oneof![
        "[^\n\r]{0,80}",
        (json_value(), any::<prop::sample::Index>()).prop_map(|(v, at)| {
            let text = json!({"return": v, "id": 1}).to_string();
            let cut = at.index(text.len());
            let cut = (0..=cut).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            text[..cut].to_string()
        }),
        json_value()
            .prop_filter("not a reply or a dropped command", |v| {
                v.get("id").is_none() && v.get("event").is_none_or(|e| e != "COMMAND_DROPPED")
            })
            .prop_map(|v| v.to_string()),
        (json_value(), "[A-Z_]{1,12}")
            .prop_filter("not COMMAND_DROPPED", |(_, e)| e != "COMMAND_DROPPED")
            .prop_map(|(data, e)| { json!({"event": e, "data": data}).to_string() }),
        // A reply to some other command (an id never issued in this session).
        (json_value(), 1_000u64..).prop_map(|(v, id)| json!({"return": v, "id": id}).to_string()),
    ]
}

fn status_info() -> impl Strategy<Value = StatusInfo> {
    (any::<bool>(), "[a-z-]{1,16}").prop_map(|(running, status)| StatusInfo { running, status })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Noise before the reply changes nothing: the command gets its generated reply.
    #[test]
    fn noise_before_a_reply_is_skipped_and_the_reply_decodes(noise in proptest::collection::vec(noise_line(), 0..6), s in status_info()) {
        let script = Script { before: noise.into_iter().map(String::into_bytes).collect(), reply: Some(json!({"return": s})) };
        let got = runtime().block_on(async {
            let q = Qmp::connect(&fake("noise", script).await, Duration::from_secs(5)).await?;
            q.query_status().await
        });
        prop_assert_eq!(got.map_err(|e| e.to_string()), Ok(s));
    }

    /// Any JSON as the `return` of `query-status`: the decoded status, or a typed
    /// protocol error naming the command; never a panic.
    #[test]
    fn any_return_value_decodes_or_is_a_protocol_error(v in json_value()) {
        let script = Script { before: vec![], reply: Some(json!({"return": v.clone()})) };
        let got = runtime().block_on(async {
            let q = Qmp::connect(&fake("ret", script).await, Duration::from_secs(5)).await?;
            q.query_status().await
        });
        match (got, serde_json::from_value::<StatusInfo>(v)) {
            (Ok(s), Ok(want)) => prop_assert_eq!(s, want),
            (Err(QmpError::Protocol { context, .. }), Err(_)) => prop_assert_eq!(context, "query-status"),
            (got, want) => prop_assert!(false, "got {:?}, serde says {:?}", got.map_err(|e| e.to_string()), want.map_err(|e| e.to_string())),
        }
    }

    /// Any JSON as the `error` of a reply: a refusal carrying QEMU's class and text
    /// where they are strings; a reply with neither `return` nor `error` is a typed error.
    #[test]
    fn any_error_value_is_a_refusal(e in json_value(), without_either in any::<bool>()) {
        let reply = if without_either { json!({"neither": e.clone()}) } else { json!({"error": e.clone()}) };
        let script = Script { before: vec![], reply: Some(reply) };
        let got = runtime().block_on(async {
            let q = Qmp::connect(&fake("err", script).await, Duration::from_secs(5)).await?;
            q.stop().await
        });
        match got {
            Err(QmpError::Refused { command, class, desc }) => {
                prop_assert_eq!(command, "stop");
                if without_either {
                    prop_assert_eq!(class, "Protocol");
                } else {
                    prop_assert_eq!(class, e.get("class").and_then(Value::as_str).unwrap_or("Unknown"));
                    prop_assert_eq!(desc, e.get("desc").and_then(Value::as_str).unwrap_or(""));
                }
            }
            other => prop_assert!(false, "expected a refusal, got {:?}", other.map_err(|e| e.to_string())),
        }
    }

    /// Generated events arrive as generated, between noise lines, and the command's
    /// reply still comes.
    #[test]
    fn generated_events_arrive_as_sent(noise in proptest::collection::vec(noise_line(), 0..3), name in "[A-Z_]{1,16}", data in json_value(),
                                       seconds in any::<u32>(), micros in 0u32..1_000_000) {
        prop_assume!(name != "COMMAND_DROPPED");
        let ev = json!({"event": name, "data": data, "timestamp": {"seconds": seconds, "microseconds": micros}});
        let mut before: Vec<Vec<u8>> = noise.into_iter().map(String::into_bytes).collect();
        before.push(ev.to_string().into_bytes());
        let script = Script { before, reply: Some(json!({"return": {}})) };
        let got = runtime().block_on(async {
            let q = Qmp::connect(&fake("event", script).await, Duration::from_secs(5)).await?;
            let mut rx = q.events();
            q.stop().await?;
            Qmp::wait_event(&mut rx, &name, Duration::from_secs(5)).await
        });
        let got = got.map_err(|e| e.to_string());
        prop_assert!(got.is_ok(), "{:?}", got);
        let got = got.unwrap_or_else(|_| unreachable!());
        // The data as its JSON text reads (serde_json without `float_roundtrip` may read
        // a float's last digit differently from the f64 that was printed).
        let sent: Value = serde_json::from_str(&data.to_string()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!((got.event, got.data, got.timestamp), (name, sent, ev["timestamp"].clone()));
    }

    /// A line that is not UTF-8 ends the session: the pending command fails at once as
    /// closed (not a hang, not a panic), and so does every later one.
    #[test]
    fn bytes_that_are_not_utf8_close_the_session_with_a_typed_error(
        head in "[ -~]{0,20}", bad in proptest::collection::vec(0x80u8..=0xff, 1..4), tail in "[ -~]{0,20}"
    ) {
        let mut line = head.into_bytes();
        line.extend_from_slice(&bad);
        line.extend_from_slice(tail.as_bytes());
        prop_assume!(std::str::from_utf8(&line).is_err());
        let script = Script { before: vec![line], reply: Some(json!({"return": {}})) };
        let got = runtime().block_on(async {
            let q = Qmp::connect(&fake("utf8", script).await, Duration::from_secs(5)).await?;
            let first = q.execute_raw("stop", None).await;
            let second = q.execute_raw("cont", None).await;
            Ok::<_, QmpError>((first, second))
        });
        match got {
            Ok((Err(QmpError::Closed { command: a }), Err(QmpError::Closed { command: b }))) => prop_assert_eq!((a.as_str(), b.as_str()), ("stop", "cont")),
            other => prop_assert!(false, "expected two closed errors, got {:?}", other.map(|(a, b)| (a.map_err(|e| e.to_string()), b.map_err(|e| e.to_string()))).map_err(|e| e.to_string())),
        }
    }

}

proptest! {
    // Each case waits out a timeout: few cases.
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// A QEMU that never finishes its reply line (a truncated reply, no newline) gives
    /// the command a timeout naming it.
    #[test]
    fn a_reply_never_finished_times_out_naming_the_command(v in json_value(), at in any::<prop::sample::Index>()) {
        let text = json!({"return": v, "id": 2}).to_string();
        let cut = at.index(text.len());
        let cut = (0..=cut).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        let script = Script { before: vec![text.as_bytes()[..cut].to_vec()], reply: None };
        // The fake ends each scripted line with a newline: a partial reply followed by a
        // newline is a malformed line, skipped; the command then waits for its reply.
        let got = runtime().block_on(async {
            let q = Qmp::connect(&fake("trunc", script).await, Duration::from_secs(5)).await?;
            Ok::<_, QmpError>(q.execute_raw_timeout("query-status", None, Duration::from_millis(50)).await)
        });
        match got {
            Ok(Err(QmpError::Timeout { command, .. })) => prop_assert_eq!(command, "query-status"),
            other => prop_assert!(false, "expected a timeout, got {:?}", other.map(|r| r.map_err(|e| e.to_string())).map_err(|e| e.to_string())),
        }
    }
}
