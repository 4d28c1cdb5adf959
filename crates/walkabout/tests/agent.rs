//! The agent runs real Linux guests under QEMU: boot, heartbeats, pause/resume, stop,
//! re-attach after an agent restart (also one killed while QEMU starts), and clear errors
//! for bad input.

mod common;

use common::AgentProc;
use std::time::Duration;
use walkabout_api::{Accel, VmInfo, VmSpec, VmState};
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
    let boot = TempDir::new("bootdir").expect("temp dir");
    let agent = AgentProc::start(&["--capacity", "1G", "--boot-dir", boot.path().to_str().expect("utf8")]);
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

    // Option strings in a machine type or CPU model never reach QEMU: 422 naming the field.
    for (field, value) in [
        ("machine type", "q35,accel=kvm"),
        ("machine type", "pc,memory-backend=m0"),
        ("CPU model", "host,+vmx"),
        ("CPU model", "max,-pdpe1gb"),
    ] {
        let name = format!("opt{}", value.len());
        let mut spec = VmSpec::new(&name, 128);
        if field == "machine type" {
            spec.machine = Some(value.into());
        } else {
            spec.cpu_model = Some(value.into());
        }
        let e = agent.call(|c| async move { c.create_vm(&spec).await }).expect_err("an option string refused");
        assert_eq!((e.status(), e.kind()), (Some(422), Some(walkabout_api::ErrorKind::InvalidSpec)), "{e}");
        assert!(e.to_string().contains(&format!("{field} {value:?}")), "{e}");
        assert_eq!(qemus_named(&name), Vec::<i64>::new(), "a QEMU started for {value}");
    }
    // A FIFO where a kernel may be: refused without opening it, the agent answering on.
    let fifo = boot.path().join("vmlinuz");
    let c_path = std::ffi::CString::new(fifo.to_str().expect("utf8")).expect("a path");
    // SAFETY: mkfifo(3) on a NUL-terminated path of our temporary directory; the result
    // is checked.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo {}", fifo.display());
    let client = agent.client();
    let spec = VmSpec { kernel: Some(fifo.clone()), ..VmSpec::new("fifo", 128) };
    let creating = std::thread::spawn(move || common::block_on(None, move || async move { client.create_vm(&spec).await }));
    let meanwhile = agent.host_info();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !creating.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(creating.is_finished(), "POST /v1/vms with the FIFO {} as kernel hangs", fifo.display());
    let e = creating.join().expect("the create's thread").expect_err("a FIFO kernel refused");
    assert_eq!(e.status(), Some(422), "{e}");
    assert!(e.to_string().contains("is not a file of the agent's image catalog or boot directories"), "{e}");
    assert!(meanwhile.vms >= 1, "{meanwhile:?}");
    assert_eq!(qemus_named("fifo"), Vec::<i64>::new());

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

/// Live QEMUs (`qemu-system-*` as their program) started with `-name NAME`.
fn qemus_named(name: &str) -> Vec<i64> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return vec![] };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i64>().ok()))
        .filter(|pid| alive(*pid))
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let qemu = args.first().is_some_and(|a| a.rsplit('/').next().unwrap_or_default().starts_with("qemu-system"));
            qemu && args.windows(2).any(|w| w[0] == "-name" && w[1] == name)
        })
        .collect()
}

/// The real QEMU on `PATH`.
fn qemu_on_path() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("qemu-system-x86_64")).find(|p| p.is_file()).expect("qemu-system-x86_64 on PATH")
}

#[test]
fn an_agent_killed_while_qemu_starts_knows_that_qemu_when_it_comes_back() {
    // The agent waits for QEMU's launcher to return (QEMU has daemonized) before it
    // records the pid and answers. This launcher returns 5 s after QEMU: the kill lands
    // after QEMU runs with its pid file and before the create answers, every time.
    let dir = TempDir::new("slowlaunch").expect("temp dir");
    let launcher = dir.path().join("qemu-system-x86_64");
    let script =
        format!("#!/bin/sh\n{} \"$@\"\nrc=$?\ncase \" $* \" in *\" -daemonize \"*) sleep 5 ;; esac\nexit $rc\n", qemu_on_path().display());
    std::fs::write(&launcher, script).expect("write the launcher");
    std::process::Command::new("chmod").args(["+x", launcher.to_str().expect("utf8")]).status().expect("chmod");
    let name = format!("orphan{}", std::process::id());
    let mut agent = AgentProc::start(&["--qemu", launcher.to_str().expect("utf8")]);
    let client = agent.client();
    let spec = VmSpec::new(&name, 128);
    let creating = std::thread::spawn(move || common::block_on(None, move || async move { client.create_vm(&spec).await }));
    let pid_file = agent.data.join("vms").join(&name).join("qemu.pid");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let qemu: i64 = loop {
        let pid = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse().ok());
        if let Some(pid) = pid.filter(|p| alive(*p)) {
            break pid;
        }
        assert!(std::time::Instant::now() < deadline, "QEMU of {name} never wrote {}", pid_file.display());
        std::thread::sleep(Duration::from_millis(10));
    };

    agent.kill();
    let answer = creating.join().expect("the create's thread");
    agent.restart().expect("restart the agent");
    let v = agent.try_info(&name);
    let running = qemus_named(&name);

    assert!(answer.is_err(), "the create answered before the agent was killed: {answer:?}");
    let v = v.unwrap_or_else(|| panic!("the restarted agent does not know the VM whose QEMU {qemu} runs: {running:?}"));
    if v.record.state == VmState::Running {
        assert_eq!(v.record.pid, Some(i32::try_from(qemu).expect("pid")), "{v:?}");
        assert_eq!(running, vec![qemu], "QEMUs named {} besides the adopted one", v.record.spec.name);
        // Adopted and watched: its QEMU ending is seen.
        walkabout_testbed::kill9(qemu);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let v = loop {
            let v = agent.info(&name);
            if v.record.state == VmState::Stopped || std::time::Instant::now() > deadline {
                break v;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(v.record.state, VmState::Stopped, "the adopted VM's QEMU was killed but the agent still says: {v:?}");
        assert!(v.record.reason.as_deref().is_some_and(|r| r.contains("QEMU exited")), "{v:?}");
    } else {
        assert!(v.record.reason.is_some(), "not running and no reason why: {v:?}");
        assert!(running.is_empty(), "QEMU {running:?} runs for a VM the agent reports {:?}", v.record.state);
    }
    agent.call(|c| async move { c.delete_vm(&name).await }).expect("delete the VM");
}
