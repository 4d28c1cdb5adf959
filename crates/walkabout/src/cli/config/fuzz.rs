//! Property tests of `--config FILE` (issue 11, "inputs fuzzed"): a generated TOML
//! config becomes exactly the flags it stands for; any text is flags or an error that
//! names the file and, for TOML errors, the line; every flag produced is one option name.

use super::*;
use proptest::prelude::*;

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One setting: its TOML and the command-line words it stands for.
#[derive(Debug, Clone)]
enum Setting {
    Text(String),
    Int(i64),
    Flag(bool),
    List(Vec<String>),
}

impl Setting {
    fn toml(&self) -> String {
        match self {
            Setting::Text(s) => toml_string(s),
            Setting::Int(i) => i.to_string(),
            Setting::Flag(b) => b.to_string(),
            Setting::List(items) => format!("[{}]", items.iter().map(|s| toml_string(s)).collect::<Vec<_>>().join(", ")),
        }
    }

    fn words(&self, flag: &str) -> Vec<String> {
        match self {
            Setting::Text(s) => vec![flag.into(), s.clone()],
            Setting::Int(i) => vec![flag.into(), i.to_string()],
            Setting::Flag(true) => vec![flag.into()],
            Setting::Flag(false) => vec![],
            Setting::List(items) => items.iter().flat_map(|s| [flag.to_string(), s.clone()]).collect(),
        }
    }
}

fn setting() -> impl Strategy<Value = Setting> {
    prop_oneof![
        any::<String>().prop_map(Setting::Text),
        "[ -~]{0,20}".prop_map(Setting::Text),
        any::<i64>().prop_map(Setting::Int),
        any::<bool>().prop_map(Setting::Flag),
        proptest::collection::vec("[ -~]{0,12}", 0..4).prop_map(Setting::List),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn a_generated_config_is_exactly_its_flags(settings in proptest::collection::btree_map("[a-z][a-z0-9-]{0,15}", setting(), 0..8)) {
        let text: String = settings.iter().map(|(k, v)| format!("{k} = {}\n", v.toml())).collect();
        let want: Vec<String> = settings.iter().flat_map(|(k, v)| v.words(&format!("--{k}"))).collect();
        prop_assert_eq!(flags(&text, "agent.toml").map_err(|e| e.to_string()), Ok(want), "{}", text);
    }

    /// Underscores in keys are the options' dashes.
    #[test]
    fn underscores_in_keys_become_dashes(key in "[a-z]{1,6}(_[a-z]{1,6}){1,3}", value in "[ -~]{0,12}") {
        let f = flags(&format!("{key} = {}\n", toml_string(&value)), "c.toml").map_err(|e| e.to_string());
        prop_assert_eq!(f, Ok(vec![format!("--{}", key.replace('_', "-")), value]));
    }

    /// Any text: flags, each an option name followed by its values; or an error naming
    /// the file (and the line, for text that is not TOML).
    #[test]
    fn any_text_is_flags_or_an_error_naming_the_file_and_place(text in "\\PC{0,120}|[ -~\n]{0,160}|([a-z\"_ -]{0,8} ?= ?[ -~]{0,16}\n){0,5}") {
        match flags(&text, "daemon.toml") {
            Ok(words) => {
                if let Some(first) = words.first() {
                    prop_assert!(first.len() > 2 && first.starts_with("--"), "{:?}", words);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains("daemon.toml"), "{}", msg);
                match e {
                    ConfigError::Parse { reason, .. } => prop_assert!(reason.contains("line"), "{}", reason),
                    ConfigError::Value { key, .. } | ConfigError::Key { key, .. } => prop_assert!(msg.contains(&format!("`{key}`")), "{}", msg),
                    other => prop_assert!(false, "{}", other),
                }
            }
        }
    }

    /// Every key becomes one option: a key that is no option name (empty, with `=` or
    /// spaces, beginning with `-`) is refused naming it, never turned into `--` (which
    /// would end the options) or `--key=...`.
    #[test]
    fn every_key_is_one_option_name_or_refused(key in "[a-z=. -]{0,6}", value in "[a-z]{0,6}") {
        let text = format!("{} = {}\n", toml_string(&key), toml_string(&value));
        match flags(&text, "c.toml") {
            Ok(words) => {
                let name = words.first().and_then(|w| w.strip_prefix("--")).unwrap_or("");
                prop_assert!(!name.is_empty() && !name.starts_with('-') && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{:?} from key {:?}", words, key);
            }
            Err(e) => prop_assert!(e.to_string().contains(&format!("`{key}`")), "{}", e),
        }
    }
}

/// The minimal input the property found: a key `""` became the flag `--`, which ends
/// the options (every flag after `--config` would have been read as a value).
#[test]
fn an_empty_key_is_refused_naming_it() {
    let e = flags("\"\" = \"x\"\n", "agent.toml").expect_err("an empty key");
    assert!(matches!(e, ConfigError::Key { ref key, .. } if key.is_empty()), "{e}");
    let e = flags("\"listen=0.0.0.0:1\" = true\n", "agent.toml").expect_err("a key with '='");
    assert!(e.to_string().contains("`listen=0.0.0.0:1`"), "{e}");
}
