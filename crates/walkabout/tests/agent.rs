//! The agent runs real Linux guests under QEMU: boot, heartbeats, pause/resume, stop,
//! re-attach after an agent restart, and clear errors for bad input.

mod common;

use common::AgentProc;
use std::time::Duration;
use walkabout_api::{Accel, VmInfo, VmState};
use walkabout_testbed::{alive, TempDir};

#[test]
fn boots_guests_with_one_and_two_vcpus_that_report_their_cpus() {
    let agent = AgentProc::start(&[]);
    let one = agent.create(&["--name", "one", "--memory", "256M", "--vcpus", "1", "--workload", "dirty:32:16"]);
    let two = agent.create(&["--name", "two", "--memory", "256M", "--vcpus", "2"]);
    assert_eq!(one.guest.cpus, Some(1), "{one:?}");
    assert_eq!(two.guest.cpus, Some(2), "{two:?}");
    for name in ["one", "two"] {
        let v = agent.wait_heartbeats(name, 20);
        assert_eq!(v.guest.corrupt_pages, 0, "{v:?}");
        assert_eq!(v.guest.seq_breaks, 0, "{v:?}");
        assert!(!v.guest.kernel_trouble, "{v:?}");
        assert_eq!(v.record.state, VmState::Running, "{v:?}");
    }
}

#[test]
fn pause_stops_the_heartbeat_and_resume_continues_the_sequence() {
    let agent = AgentProc::start(&[]);
    agent.cli(&["vm", "create", "--name", "p", "--memory", "256M", "--workload", "dirty:16:8"]);
    agent.wait_heartbeats("p", 5);
    let paused: VmInfo = agent.cli_as(&["vm", "pause", "p"]);
    assert_eq!(paused.record.state, VmState::Paused, "{paused:?}");
    let before = agent.info("p").guest.last_seq.expect("seq");
    std::thread::sleep(Duration::from_millis(1500));
    let during = agent.info("p").guest.last_seq.expect("seq");
    assert_eq!(before, during, "heartbeats advanced while paused");
    let resumed: VmInfo = agent.cli_as(&["vm", "resume", "p"]);
    assert_eq!(resumed.record.state, VmState::Running, "{resumed:?}");
    let after = agent.wait_heartbeats("p", during + 10);
    assert!(after.guest.last_seq.expect("seq") > during, "{after:?}");
    assert_eq!(after.guest.seq_breaks, 0, "sequence broke across pause: {after:?}");
    assert_eq!(after.guest.corrupt_pages, 0, "{after:?}");
}

#[test]
fn stop_ends_the_qemu_process_and_delete_forgets_the_vm() {
    let agent = AgentProc::start(&[]);
    let v = agent.create(&["--name", "s", "--memory", "256M"]);
    let pid = i64::from(v.record.pid.expect("pid"));
    assert!(alive(pid));
    let stopped: VmInfo = agent.cli_as(&["vm", "stop", "s"]);
    assert_eq!(stopped.record.state, VmState::Stopped, "{stopped:?}");
    assert!(!alive(pid), "QEMU {pid} still runs after stop");
    agent.cli(&["vm", "delete", "s"]);
    assert_eq!(agent.try_info("s"), None, "the agent still has the deleted VM");
    let err = agent.cli_fails(&["vm", "info", "s"]);
    assert!(err.contains("no VM named `s`"), "{err}");
}

#[test]
fn a_restarted_agent_reattaches_to_the_vm_that_kept_running() {
    let mut agent = AgentProc::start(&[]);
    let v = agent.create(&["--name", "r", "--memory", "256M", "--workload", "dirty:16:8"]);
    let pid = v.record.pid.expect("pid");
    agent.wait_heartbeats("r", 5);
    agent.kill();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(alive(i64::from(pid)), "the VM died with its agent");
    agent.restart().expect("restart the agent");
    let v = agent.info("r");
    assert_eq!(v.record.state, VmState::Running, "{v:?}");
    assert_eq!(v.record.pid, Some(pid), "{v:?}");
    let seen = v.guest.heartbeats;
    // The re-attached QMP works: pause and resume through it.
    assert_eq!(agent.cli_as::<VmInfo>(&["vm", "pause", "r"]).record.state, VmState::Paused);
    assert_eq!(agent.cli_as::<VmInfo>(&["vm", "resume", "r"]).record.state, VmState::Running);
    let v = agent.wait_heartbeats("r", seen + 10);
    assert_eq!(v.guest.seq_breaks, 0, "{v:?}");
    assert_eq!(v.guest.corrupt_pages, 0, "{v:?}");
}

#[test]
fn bad_input_gets_a_specific_error_and_other_vms_keep_running() {
    let agent = AgentProc::start(&["--capacity", "1G"]);
    agent.create(&["--name", "ok", "--memory", "256M"]);
    let seq0 = agent.wait_heartbeats("ok", 3).guest.last_seq.expect("seq");

    let e = agent.cli_fails(&["vm", "info", "ghost"]);
    assert!(e.contains("no VM named `ghost`"), "{e}");
    let e = agent.cli_fails(&["vm", "create", "--name", "ok", "--memory", "256M"]);
    assert!(e.contains("a VM named `ok` already exists"), "{e}");
    let e = agent.cli_fails(&["vm", "create", "--name", "big", "--memory", "2G"]);
    assert!(e.contains("needs 2048 MiB but this host has 768 MiB free"), "{e}");
    let e = agent.cli_fails(&["vm", "create", "--name", "w", "--memory", "256M", "--workload", "spin:9"]);
    assert!(e.contains("unknown workload") && e.contains("spin:9"), "{e}");
    let notkernel = TempDir::new("nk").expect("temp dir");
    let fake = notkernel.path().join("vmlinuz");
    std::fs::write(&fake, b"this is not a kernel").expect("write");
    let e = agent.cli_fails(&["vm", "create", "--name", "k", "--memory", "256M", "--kernel", fake.to_str().expect("utf8")]);
    // Outside the image catalog and the boot directories: refused before it is opened.
    assert!(e.contains("is not a file of the agent's image catalog or boot directories"), "{e}");

    let v = agent.wait_heartbeats("ok", seq0 + 10);
    assert_eq!(v.record.state, VmState::Running, "{v:?}");
    assert_eq!(v.guest.seq_breaks, 0, "{v:?}");
    let listed = agent.vms();
    assert_eq!(listed.len(), 1, "failed creates left records: {listed:?}");
    // The CLI lists the same, in its JSON.
    let cli: Vec<VmInfo> = agent.cli_as(&["vm", "list"]);
    assert_eq!(cli.iter().map(|v| v.record.spec.name.as_str()).collect::<Vec<_>>(), ["ok"], "{cli:?}");
}

#[test]
fn qemu_too_old_or_missing_is_refused_at_agent_start() {
    let dir = TempDir::new("oldqemu").expect("temp dir");
    let fake = dir.path().join("qemu-system-x86_64");
    std::fs::write(&fake, "#!/bin/sh\necho 'QEMU emulator version 7.2.0 (Debian 1:7.2+dfsg-7)'\n").expect("write");
    std::process::Command::new("chmod").args(["+x", fake.to_str().expect("utf8")]).status().expect("chmod");
    let data = dir.path().join("data");
    let d = data.to_str().expect("utf8");
    let e = common::fails(&["agent", "--listen", "127.0.0.1:0", "--data-dir", d, "--qemu", fake.to_str().expect("utf8")]);
    assert!(e.contains("QEMU 7.2.0") && e.contains("too old") && e.contains(">= 10"), "{e}");
    let e = common::fails(&["agent", "--listen", "127.0.0.1:0", "--data-dir", d, "--qemu", "/nonexistent/qemu"]);
    assert!(e.contains("`/nonexistent/qemu` not found"), "{e}");
}

#[test]
fn auto_accelerator_follows_the_measurement_and_says_why() {
    let agent = AgentProc::start(&["--accel", "auto"]);
    let host = agent.host_info();
    let accel = &host.accel;
    let tcg = accel.tcg_ms.expect("TCG was measured");
    let expected = match accel.kvm_ms {
        Some(kvm) if kvm <= tcg => Accel::Kvm,
        _ => Accel::Tcg,
    };
    assert_eq!(accel.accel, expected, "{host:?}");
    assert!(accel.reason.starts_with("auto:"), "{host:?}");
    assert!(host.qemu.major >= 10, "{host:?}");
    // `host info` prints the same document.
    let cli: walkabout_api::HostInfo = agent.cli_as(&["host", "info"]);
    assert_eq!(cli.accel, host.accel);
}

#[test]
fn an_agent_killed_while_it_probes_cpu_models_leaves_no_probe_qemu_behind() {
    let mut agent = AgentProc::start(&[]);
    let client = agent.client();
    // The probe asks a throwaway QEMU about every CPU model: seconds under TCG.
    let asking = std::thread::spawn(move || common::block_on(None, move || async move { client.cpu().await }));
    let agent_pid = agent.pid().expect("agent pid");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let probe: i64 = loop {
        let out = std::process::Command::new("pgrep").args(["-P", &agent_pid.to_string(), "-f", "cpu-probe"]).output().expect("pgrep");
        if let Some(pid) = String::from_utf8_lossy(&out.stdout).lines().next().and_then(|l| l.trim().parse().ok()) {
            break pid;
        }
        assert!(std::time::Instant::now() < deadline, "no CPU probe QEMU appeared under agent {agent_pid}");
        std::thread::sleep(Duration::from_millis(20));
    };
    agent.kill();
    let _ = asking.join();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive(probe) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(probe), "the CPU probe QEMU {probe} outlived its killed agent");
}
