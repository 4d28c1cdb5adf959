//! The guest's network: its static IPv4 address, taken from the kernel command line
//! (`walkabout.ip=10.77.0.12/24`; the guest kernel has no `ip=` autoconfiguration), and
//! a tiny TCP echo service on [`ECHO_PORT`] through which a client on the host side
//! sees the guest's downtime as its users would.
//!
//! Echo protocol: the client sends lines (`<seq>\n`); the guest writes each line back as
//! it was received, as soon as it has it. One thread per connection; a connection lives
//! as long as the client keeps it, across any number of migrations.
//!
//! The address parser ([`Ipv4Cidr`]) is shared with the host side: the agent validates a
//! NIC's address with it, the prober derives the guest's echo address from it.

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant};

/// The kernel command line parameter carrying the guest's address with its prefix.
pub const IP_PARAM: &str = "walkabout.ip";

/// The TCP port of the guest's echo service.
pub const ECHO_PORT: u16 = 7007;

/// How long the guest waits for its network interface to appear (its driver is a
/// module loaded by `/init`, and probing it under TCG takes a moment).
const INTERFACE_WAIT: Duration = Duration::from_secs(30);

/// An IPv4 address with its prefix length (`10.77.0.12/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// The prefix length, 0-32.
    pub prefix: u8,
}

/// Why a text is not an IPv4 address with a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseCidrError {
    /// The text.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for ParseCidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "address {:?} is not an IPv4 address with a prefix (like 10.77.0.12/24): {}", self.text, self.reason)
    }
}

impl std::error::Error for ParseCidrError {}

impl FromStr for Ipv4Cidr {
    type Err = ParseCidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason| ParseCidrError { text: text.to_owned(), reason };
        let (addr, prefix) = text.split_once('/').ok_or_else(|| bad("no /prefix"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad("the prefix is not a number"))?;
        if !(1..=32).contains(&prefix) {
            return Err(bad("the prefix must be 1 to 32"));
        }
        if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() || addr.is_loopback() {
            return Err(bad("not a usable host address"));
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The text of the last `walkabout.ip=...` parameter on `cmdline`, if any.
pub fn ip_param(cmdline: &str) -> Option<&str> {
    cmdline.split_ascii_whitespace().filter_map(|word| word.strip_prefix(IP_PARAM)?.strip_prefix('=')).next_back()
}

/// The guest's address as `cmdline` gives it: `None` when absent, an error when malformed.
pub fn ip_from_cmdline(cmdline: &str) -> Option<Result<Ipv4Cidr, ParseCidrError>> {
    ip_param(cmdline).map(str::parse)
}

/// The first network interface other than loopback, once it exists (waits up to
/// [`INTERFACE_WAIT`]).
fn first_interface(sys_class_net: &Path) -> Option<String> {
    let start = Instant::now();
    loop {
        let mut names: Vec<String> = std::fs::read_dir(sys_class_net)
            .map(|dir| dir.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n != "lo").collect())
            .unwrap_or_default();
        names.sort();
        if let Some(name) = names.into_iter().next() {
            return Some(name);
        }
        if start.elapsed() > INTERFACE_WAIT {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Runs busybox `ip ARGS`; an error carries what it said.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Gives the guest's first network interface `cidr` and brings it (and loopback) up.
/// Returns the interface's name.
pub fn configure(cidr: Ipv4Cidr) -> Result<String, String> {
    let dev = first_interface(Path::new("/sys/class/net"))
        .ok_or_else(|| format!("no network interface appeared in {} s", INTERFACE_WAIT.as_secs()))?;
    ip(&["link", "set", "lo", "up"])?;
    ip(&["addr", "add", &cidr.to_string(), "dev", &dev])?;
    ip(&["link", "set", &dev, "up"])?;
    Ok(dev)
}

/// Serves the echo on `listener` forever, one thread per connection.
pub fn serve_echo(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        thread::spawn(move || echo(stream));
    }
}

/// Writes every line read from `stream` back to it, until the client goes.
fn echo(stream: TcpStream) {
    // Replies go out at once rather than waiting to be coalesced.
    let _ = stream.set_nodelay(true);
    let Ok(mut out) = stream.try_clone() else { return };
    let mut lines = BufReader::new(stream);
    let mut line = Vec::with_capacity(32);
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if out.write_all(&line).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_with_prefix_parses() {
        let c: Ipv4Cidr = "10.77.0.12/24".parse().expect("parses");
        assert_eq!(c, Ipv4Cidr { addr: Ipv4Addr::new(10, 77, 0, 12), prefix: 24 });
        assert_eq!(c.to_string(), "10.77.0.12/24");
    }

    #[test]
    fn an_address_without_prefix_is_refused() {
        let e = "10.77.0.12".parse::<Ipv4Cidr>().expect_err("refused");
        assert_eq!(e.reason, "no /prefix");
    }

    #[test]
    fn a_prefix_out_of_range_is_refused() {
        let e = "10.77.0.12/33".parse::<Ipv4Cidr>().expect_err("refused");
        assert_eq!(e.reason, "the prefix must be 1 to 32");
    }

    #[test]
    fn a_non_address_is_refused() {
        let e = "10.77.0/24".parse::<Ipv4Cidr>().expect_err("refused");
        assert_eq!(e.reason, "not an IPv4 address");
    }

    #[test]
    fn the_address_is_found_on_the_command_line() {
        let got = ip_from_cmdline("console=ttyS0 walkabout.ip=10.77.0.5/16 quiet\n");
        assert_eq!(got, Some(Ok(Ipv4Cidr { addr: Ipv4Addr::new(10, 77, 0, 5), prefix: 16 })));
    }

    #[test]
    fn no_address_on_the_command_line_is_none() {
        assert_eq!(ip_from_cmdline("console=ttyS0 walkabout.ipx=1 ip=dhcp"), None);
    }

    #[test]
    fn the_echo_answers_each_line_on_one_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        thread::spawn(move || serve_echo(listener));
        let mut client = TcpStream::connect(addr).expect("connect");
        client.write_all(b"1\n2\n").expect("write");
        let mut reader = BufReader::new(client.try_clone().expect("clone"));
        let (mut a, mut b) = (String::new(), String::new());
        reader.read_line(&mut a).expect("first reply");
        reader.read_line(&mut b).expect("second reply");
        assert_eq!((a.as_str(), b.as_str()), ("1\n", "2\n"));
    }
}
