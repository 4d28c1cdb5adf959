//! A small W3C WebDriver client for the console's tests: Debian's `chromedriver` driving
//! its headless `chromium`. Only what the tests use: open a page, find elements, read
//! text and attributes, click, drag with real pointer input (pointer down, moves, up,
//! as a mouse would send them), type with real key events, run a script, take
//! screenshots. Each call has a timeout.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use walkabout_testbed::KillOnDrop;

/// The key of an element reference in WebDriver's JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// How many times an action is retried on an element the page replaced meanwhile.
const STALE_RETRIES: u32 = 5;

/// An element of the page, as the driver names it.
#[derive(Clone, Debug)]
pub struct Element(String);

/// A headless Chromium under `chromedriver`, one session; both end on drop.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    session: String,
    base: String,
    artifacts: PathBuf,
    _driver: KillOnDrop,
}

impl Browser {
    /// Starts `chromedriver` on a free port and a headless Chromium session with a
    /// `width`x`height` window; screenshots go to `artifacts`.
    pub fn start(artifacts: &Path, width: u32, height: u32) -> Browser {
        for bin in [CHROMEDRIVER, CHROMIUM] {
            assert!(Path::new(bin).exists(), "{bin} is missing: scripts/setup-host.sh installs Debian's chromium and chromium-driver");
        }
        std::fs::create_dir_all(artifacts).expect("create the artifacts directory");
        let port = walkabout_testbed::free_ports(1).expect("a free port for chromedriver");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = KillOnDrop(child);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("an HTTP client");
        let base = format!("http://127.0.0.1:{port}");
        let mut b = Browser { rt, http, session: String::new(), base, artifacts: artifacts.to_path_buf(), _driver: driver };
        let start = Instant::now();
        while b.raw("GET", "/status", None).ok().and_then(|v| v["ready"].as_bool()) != Some(true) {
            assert!(start.elapsed() < Duration::from_secs(30), "chromedriver did not become ready on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {"binary": CHROMIUM, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                format!("--window-size={width},{height}"),
            ]},
        }}});
        let v = b.raw("POST", "/session", Some(caps)).unwrap_or_else(|e| panic!("cannot start a Chromium session: {e}"));
        b.session = v["sessionId"].as_str().expect("a session id").to_string();
        b
    }

    /// One WebDriver command: its `value`, or the driver's error as a sentence.
    fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self.http.post(&url).json(&body.unwrap_or_else(|| json!({}))),
        };
        self.rt.block_on(async {
            let r = req.send().await.map_err(|e| format!("{method} {path}: {e}"))?;
            let ok = r.status().is_success();
            let v: Value = r.json().await.map_err(|e| format!("{method} {path}: bad JSON: {e}"))?;
            let value = v.get("value").cloned().unwrap_or(Value::Null);
            if ok {
                Ok(value)
            } else {
                Err(format!("{method} {path}: {}: {}", value["error"], value["message"]))
            }
        })
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.raw(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Opens `url`.
    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url }))).unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// The first element matching `css`, if any.
    pub fn find(&self, css: &str) -> Option<Element> {
        let v = self.cmd("POST", "/element", Some(json!({"using": "css selector", "value": css}))).ok()?;
        v[ELEMENT].as_str().map(|id| Element(id.to_string()))
    }

    /// Every element matching `css`.
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        let v = self.cmd("POST", "/elements", Some(json!({"using": "css selector", "value": css}))).unwrap_or(Value::Null);
        v.as_array().map(|a| a.iter().filter_map(|e| e[ELEMENT].as_str().map(|id| Element(id.to_string()))).collect()).unwrap_or_default()
    }

    /// The rendered text of the first element matching `css` (`None` if none matches).
    /// Read in one script, so an element the page redraws meanwhile is never stale.
    pub fn text(&self, css: &str) -> Option<String> {
        self.script("return document.querySelector(arguments[0])?.innerText ?? null;", json!([css])).as_str().map(String::from)
    }

    /// Attribute `name` of the first element matching `css` (read in one script).
    pub fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.script("return document.querySelector(arguments[0])?.getAttribute(arguments[1]) ?? null;", json!([css, name]))
            .as_str()
            .map(String::from)
    }

    /// Clicks the first element matching `css` (which must exist), scrolled first to the
    /// middle of the window: at its top the page's sticky bar would take the click
    /// ("element click intercepted"), as WebDriver scrolls only what is out of view.
    /// The page redraws cards from the event stream, so the element found may be
    /// replaced before the click lands ("stale element reference"): then it is found
    /// again and clicked.
    pub fn click(&self, css: &str) {
        let mut tries = 0;
        loop {
            let e = self.find(css).unwrap_or_else(|| panic!("nothing to click: no {css}"));
            self.script("document.querySelector(arguments[0])?.scrollIntoView({block: 'center', inline: 'center'});", json!([css]));
            match self.cmd("POST", &format!("/element/{}/click", e.0), None) {
                Ok(_) => return,
                Err(err) if err.contains("stale element") && tries < STALE_RETRIES => tries += 1,
                Err(err) => panic!("click {css}: {err}"),
            }
        }
    }

    /// Drags the first element matching `from` onto the first matching `to` with real
    /// pointer input: press on the middle of `from`, move in steps, release on the
    /// middle of `to`.
    /// Elements the page replaced meanwhile are found again, as in [`Browser::click`].
    pub fn drag(&self, from: &str, to: &str) {
        let mut tries = 0;
        loop {
            match self.try_drag(from, to) {
                Ok(()) => return,
                Err(err) if err.contains("stale element") && tries < STALE_RETRIES => tries += 1,
                Err(err) => panic!("drag {from} onto {to}: {err}"),
            }
        }
    }

    fn try_drag(&self, from: &str, to: &str) -> Result<(), String> {
        let a = self.find(from).unwrap_or_else(|| panic!("nothing to drag: no {from}"));
        let b = self.find(to).unwrap_or_else(|| panic!("nowhere to drop: no {to}"));
        let actions = json!({"actions": [{
            "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [
                {"type": "pointerMove", "duration": 0, "origin": {ELEMENT: a.0}, "x": 0, "y": 0},
                {"type": "pointerDown", "button": 0},
                {"type": "pause", "duration": 100},
                {"type": "pointerMove", "duration": 200, "origin": "pointer", "x": 12, "y": 12},
                {"type": "pointerMove", "duration": 600, "origin": {ELEMENT: b.0}, "x": 0, "y": 0},
                {"type": "pause", "duration": 100},
                {"type": "pointerUp", "button": 0},
            ],
        }]});
        let done = self.cmd("POST", "/actions", Some(actions)).map(drop);
        let _ = self.cmd("DELETE", "/actions", None);
        done
    }

    /// Focuses the first element matching `css` and presses `key` on the keyboard (a
    /// WebDriver key code: `\u{E007}` is Enter).
    pub fn press(&self, css: &str, key: char) {
        let found =
            self.script("const e = document.querySelector(arguments[0]); if (!e) return false; e.focus(); return true;", json!([css]));
        assert_eq!(found, Value::Bool(true), "nothing to press a key on: no {css}");
        let k = key.to_string();
        let actions = json!({"actions": [{
            "type": "key", "id": "keyboard",
            "actions": [{"type": "keyDown", "value": k}, {"type": "keyUp", "value": k}],
        }]});
        self.cmd("POST", "/actions", Some(actions)).unwrap_or_else(|e| panic!("press a key on {css}: {e}"));
        let _ = self.cmd("DELETE", "/actions", None);
    }

    /// Types `text` into the first element matching `css` with real key events, after
    /// emptying it the way a person would (Ctrl+A, Backspace).
    pub fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).unwrap_or_else(|| panic!("nothing to type into: no {css}"));
        // Control (pressed, then released by NULL), Backspace: WebDriver's key codes.
        let keys = format!("\u{E009}a\u{E000}\u{E003}{text}");
        self.cmd("POST", &format!("/element/{}/value", e.0), Some(json!({ "text": keys })))
            .unwrap_or_else(|err| panic!("type {text:?} into {css}: {err}"));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub fn script(&self, script: &str, args: Value) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({"script": script, "args": args}))).unwrap_or_else(|e| panic!("script: {e}"))
    }

    /// A PNG of the window.
    pub fn screenshot(&self) -> Vec<u8> {
        let v = self.cmd("GET", "/screenshot", None).unwrap_or_else(|e| panic!("screenshot: {e}"));
        decode(&v)
    }

    /// A PNG of the first element matching `css`, if one is shown (`None` when there is
    /// none, or it went away or was hidden while the picture was taken).
    pub fn element_screenshot(&self, css: &str) -> Option<Vec<u8>> {
        let e = self.find(css)?;
        self.cmd("GET", &format!("/element/{}/screenshot", e.0), None).ok().map(|v| decode(&v))
    }

    /// Errors the page's scripts raised or logged since the last call (uncaught
    /// exceptions, `console.error`), from Chromium's log (chromedriver's `se/log`).
    pub fn script_errors(&self) -> Vec<String> {
        let v = self.cmd("POST", "/se/log", Some(json!({"type": "browser"}))).unwrap_or_else(|e| panic!("the browser's log: {e}"));
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["level"] == "SEVERE" && (l["source"] == "javascript" || l["source"] == "console-api"))
            .map(|l| l["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Saves `png` as `name` among the artifacts; returns its path.
    pub fn save(&self, name: &str, png: &[u8]) -> PathBuf {
        let p = self.artifacts.join(name);
        std::fs::write(&p, png).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// Waits until `probe` returns something (checking every 200 ms, `limit` at most);
    /// on time out, saves a screenshot and fails naming `what`.
    pub fn wait_for<T>(&self, what: &str, limit: Duration, mut probe: impl FnMut(&Browser) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = probe(self) {
                return v;
            }
            if start.elapsed() > limit {
                let shot = self.save("failure.png", &self.screenshot());
                let notice = self.text("#notice").unwrap_or_default();
                panic!("the page never showed {what} within {limit:?} (screenshot {}; notice: {notice:?})", shot.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn decode(v: &Value) -> Vec<u8> {
    use base64::Engine;
    let text = v.as_str().expect("a base64 screenshot");
    base64::engine::general_purpose::STANDARD.decode(text).expect("valid base64")
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.cmd("DELETE", "", None);
        }
    }
}
