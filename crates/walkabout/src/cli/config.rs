//! `--config FILE` for the daemons (`walkabout agent`, `walkabout controller`): a TOML
//! file whose keys are the command's long options, e.g.
//!
//! ```toml
//! listen = "0.0.0.0:7701"
//! data-dir = "/var/lib/walkabout/agent"
//! identity = "/etc/walkabout/host.pem"
//! boot-dir = ["/srv/kernels"]
//! ```
//!
//! Each key becomes `--key value` (an array repeats it; `true` is a bare flag, `false`
//! leaves it out), inserted where `--config FILE` stands, so clap checks the file's
//! settings exactly as it checks the command line. A key given both in the file and on
//! the command line is refused by clap as given twice.

use std::ffi::OsString;

/// Errors of reading a config file: the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` without a file.
    #[error("--config needs a file")]
    Missing,
    /// The file could not be read.
    #[error("cannot read the config {file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("the config {file} is not valid TOML: {reason}")]
    Parse {
        /// The file.
        file: String,
        /// The parser's message (with the line).
        reason: String,
    },
    /// A key that is no option name: empty, or with characters an option name has not
    /// (`""` would become `--`, the end of the options; `"a=b"` would become `--a=b`).
    #[error("the config {file}: key `{key}` is not an option name (letters, digits, '-' and '_', not beginning with '-')")]
    Key {
        /// The file.
        file: String,
        /// The key.
        key: String,
    },
    /// A key whose value is not a string, number, boolean or array of those.
    #[error("the config {file}: key `{key}` must be a string, number, boolean or an array of those")]
    Value {
        /// The file.
        file: String,
        /// The key.
        key: String,
    },
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

/// The command-line arguments the TOML text `text` (of file `file`) stands for.
pub fn flags(text: &str, file: &str) -> Result<Vec<String>, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse { file: file.into(), reason: e.to_string() })?;
    let mut out = vec![];
    for (key, value) in &table {
        let name_ok = key.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
        if !name_ok {
            return Err(ConfigError::Key { file: file.into(), key: key.clone() });
        }
        let flag = format!("--{}", key.replace('_', "-"));
        let bad = || ConfigError::Value { file: file.into(), key: key.clone() };
        match value {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    out.extend([flag.clone(), scalar(item).ok_or_else(bad)?]);
                }
            }
            v => out.extend([flag, scalar(v).ok_or_else(bad)?]),
        }
    }
    Ok(out)
}

/// `args` with every `--config FILE` (or `--config=FILE`) followed by the flags its
/// file stands for.
pub fn expand(args: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let file = match a.to_str() {
            Some("--config") => {
                let f = it.next().ok_or(ConfigError::Missing)?;
                out.extend([a, f.clone()]);
                f
            }
            Some(s) if s.starts_with("--config=") => {
                let f = OsString::from(&s["--config=".len()..]);
                out.push(a);
                f
            }
            _ => {
                out.push(a);
                continue;
            }
        };
        let name = file.to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read { file: name.clone(), source })?;
        out.extend(flags(&text, &name)?.into_iter().map(OsString::from));
    }
    Ok(out)
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_flags_arrays_repeat_and_false_is_left_out() {
        let text = "listen = \"0.0.0.0:7701\"\ninsecure_loopback = true\nverbose = false\nboot-dir = [\"/a\", \"/b\"]\nreserve = 512\n";
        let f = flags(text, "agent.toml").expect("flags");
        assert_eq!(f, ["--boot-dir", "/a", "--boot-dir", "/b", "--insecure-loopback", "--listen", "0.0.0.0:7701", "--reserve", "512"]);
    }

    #[test]
    fn a_table_value_or_bad_toml_is_refused_naming_the_file() {
        let e = flags("[agent]\nlisten = 1\n", "x.toml").expect_err("a table");
        assert!(e.to_string().contains("x.toml") && e.to_string().contains("`agent`"), "{e}");
        let e = flags("listen = ", "y.toml").expect_err("bad toml");
        assert!(e.to_string().contains("y.toml"), "{e}");
    }

    /// `dist/NAME` as shipped, and with its commented-out examples (`# key = value`)
    /// turned on: the command line each stands for.
    fn shipped(name: &str) -> [Vec<OsString>; 2] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist").join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let examples: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')) => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let command = name.trim_end_matches(".toml");
        [text, examples].map(|t| {
            let mut args: Vec<OsString> = vec!["walkabout".into(), command.into()];
            args.extend(flags(&t, name).unwrap_or_else(|e| panic!("{e}")).into_iter().map(OsString::from));
            args
        })
    }

    #[test]
    fn the_shipped_configs_parse_as_the_daemons_command_lines() {
        use clap::Parser;
        let [agent, agent_examples] = shipped("agent.toml");
        let [controller, controller_examples] = shipped("controller.toml");
        let parse = |args: Vec<OsString>| crate::Cli::try_parse_from(&args).map_err(|e| format!("{args:?}: {e}"));

        let a = parse(agent).expect("dist/agent.toml");
        let c = parse(controller).expect("dist/controller.toml");
        let refused: Vec<String> = [parse(agent_examples), parse(controller_examples)].into_iter().filter_map(Result::err).collect();

        assert!(matches!(a.command, crate::Command::Agent(_)));
        assert_eq!(a.identity.as_deref(), Some(std::path::Path::new("/etc/walkabout/host.pem")));
        assert!(matches!(c.command, crate::Command::Controller(_)));
        assert_eq!(refused, Vec::<String>::new(), "a commented-out example is not an option");
    }
}
