//! Choosing the accelerator by measurement.
//!
//! `/dev/kvm` opening is not proof that KVM is useful: on some nested or emulated hosts it
//! runs guest code orders of magnitude slower than TCG. So `auto` boots a 512-byte boot
//! sector that spins a fixed loop and then writes one byte to the serial port, under TCG
//! and under KVM, and picks KVM only if it finishes no slower than TCG. The TCG run also
//! bounds the wait for KVM, so a useless KVM costs a few seconds at agent start, once.

use crate::QemuError;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant};

pub use walkabout_api::{Accel, AccelChoice};

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelRequest {
    /// Measure and pick.
    Auto,
    /// Use KVM.
    Kvm,
    /// Use TCG.
    Tcg,
}

impl std::str::FromStr for AccelRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelRequest::Auto),
            "kvm" => Ok(AccelRequest::Kvm),
            "tcg" => Ok(AccelRequest::Tcg),
            other => Err(format!("unknown accelerator '{other}': expected auto, kvm or tcg")),
        }
    }
}

/// Iterations of the calibration loop: ~0.05 s natively, ~0.3 s under TCG.
const LOOP_ITERATIONS: u32 = 50_000_000;

/// The calibration boot sector: `mov dx,0x3f8; mov ecx,N; l: dec ecx; jnz l; mov al,'K';
/// out dx,al; hlt; jmp $-1`, padded and signed 0x55AA.
fn boot_sector() -> Vec<u8> {
    let mut code = vec![0xBA, 0xF8, 0x03, 0x66, 0xB9];
    code.extend_from_slice(&LOOP_ITERATIONS.to_le_bytes());
    code.extend_from_slice(&[0x66, 0x49, 0x75, 0xFC, 0xB0, b'K', 0xEE, 0xF4, 0xEB, 0xFD]);
    code.resize(510, 0);
    code.extend_from_slice(&[0x55, 0xAA]);
    code
}

/// Decides the accelerator for `request`, measuring when asked for `auto`.
/// `work_dir` holds the calibration files.
pub async fn choose(binary: &str, request: AccelRequest, work_dir: &Path) -> Result<AccelChoice, QemuError> {
    let kvm_opens = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    match request {
        AccelRequest::Tcg => Ok(AccelChoice { accel: Accel::Tcg, reason: "tcg requested".into(), tcg_ms: None, kvm_ms: None }),
        AccelRequest::Kvm if !kvm_opens => {
            Err(QemuError::AccelUnusable { accel: "kvm".into(), reason: "/dev/kvm cannot be opened read-write".into() })
        }
        AccelRequest::Kvm => Ok(AccelChoice { accel: Accel::Kvm, reason: "kvm requested".into(), tcg_ms: None, kvm_ms: None }),
        AccelRequest::Auto if !kvm_opens => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "auto: /dev/kvm cannot be opened read-write, so TCG".into(),
            tcg_ms: None,
            kvm_ms: None,
        }),
        AccelRequest::Auto => {
            std::fs::create_dir_all(work_dir).map_err(|e| QemuError::io(format!("creating {}", work_dir.display()), e))?;
            let img = work_dir.join("calibrate.img");
            std::fs::write(&img, boot_sector()).map_err(|e| QemuError::io(format!("writing {}", img.display()), e))?;
            let tcg = run_calibration(binary, "tcg", &img, work_dir, Duration::from_secs(60)).await?;
            let Some(tcg) = tcg else {
                return Err(QemuError::AccelUnusable {
                    accel: "tcg".into(),
                    reason: "the calibration loop did not finish within 60 s".into(),
                });
            };
            let limit = (tcg * 4).max(Duration::from_secs(2));
            let tcg_ms = Some(ms(tcg));
            let kvm = match run_calibration(binary, "kvm", &img, work_dir, limit).await {
                Ok(k) => k,
                Err(e) => {
                    return Ok(AccelChoice {
                        accel: Accel::Tcg,
                        reason: format!("auto: KVM could not run the calibration ({e}), so TCG"),
                        tcg_ms,
                        kvm_ms: None,
                    })
                }
            };
            Ok(match kvm {
                Some(k) if k <= tcg => AccelChoice {
                    accel: Accel::Kvm,
                    reason: format!("auto: KVM ran the calibration loop in {} ms, TCG in {} ms", ms(k), ms(tcg)),
                    tcg_ms,
                    kvm_ms: Some(ms(k)),
                },
                Some(k) => AccelChoice {
                    accel: Accel::Tcg,
                    reason: format!(
                        "auto: /dev/kvm opens but KVM ran the calibration loop in {} ms, slower than TCG's {} ms",
                        ms(k),
                        ms(tcg)
                    ),
                    tcg_ms,
                    kvm_ms: Some(ms(k)),
                },
                None => AccelChoice {
                    accel: Accel::Tcg,
                    reason: format!(
                        "auto: /dev/kvm opens but KVM did not finish the calibration loop in {} ms; TCG did in {} ms",
                        ms(limit),
                        ms(tcg)
                    ),
                    tcg_ms,
                    kvm_ms: None,
                },
            })
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Boots the calibration sector under `accel`; the time until its byte appears, or None
/// if it did not within `limit`.
async fn run_calibration(binary: &str, accel: &str, img: &Path, dir: &Path, limit: Duration) -> Result<Option<Duration>, QemuError> {
    let serial = dir.join(format!("calibrate-{accel}.out"));
    let _ = std::fs::remove_file(&serial);
    let start = Instant::now();
    let mut child = tokio::process::Command::new(binary)
        .args(["-accel", accel, "-nodefaults", "-no-user-config", "-display", "none", "-m", "16"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=ide", img.display()))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                QemuError::Missing { binary: binary.to_string() }
            } else {
                QemuError::io(format!("running {binary}"), e)
            }
        })?;
    let result = loop {
        if std::fs::read(&serial).map(|b| b.contains(&b'K')).unwrap_or(false) {
            break Some(start.elapsed());
        }
        if start.elapsed() > limit {
            break None;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            return Err(QemuError::AccelUnusable {
                accel: accel.into(),
                reason: format!("QEMU exited ({status}) during calibration: {}", err.trim()),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let _ = child.kill().await;
    tracing::info!(accel, elapsed_ms = ?result.map(ms), "accelerator calibration");
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_sector_is_signed_and_sized() {
        let b = boot_sector();
        assert_eq!(b.len(), 512);
        assert_eq!(&b[510..], &[0x55, 0xAA]);
    }

    #[test]
    fn request_parsing_names_the_bad_value() {
        assert_eq!("kvm".parse::<AccelRequest>(), Ok(AccelRequest::Kvm));
        let err = "hvf".parse::<AccelRequest>().expect_err("unknown");
        assert!(err.contains("'hvf'"), "{err}");
    }
}
