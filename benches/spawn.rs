//! Spawn cost against the broker's size: `turnstile_broker::jail::spawn` (a
//! vfork-style clone) against `fork` (std's `Command` with a `pre_exec` hook,
//! which is what the broker used before), both exec'ing the static shim with
//! a bad argument (it exits at once), timed to the return of the spawn call,
//! in a process holding 0 and then 200 MiB of touched memory.
//!
//! Reproduce: `cargo bench -p turnstile-benches --bench spawn`.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::time::Instant;
use turnstile_benches::{report, runtime, shim};
use turnstile_broker::jail::spawn::{self, ChildSetup, Stdio};

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    // The smoke run (`cargo test --benches`) takes 2 samples, 16 MiB held.
    let (samples, held) = if bench { (200, 200) } else { (2, 16) };
    let rt = runtime();
    let shim = shim();
    let mut ballast: Vec<u8> = Vec::new();
    for mib in [0usize, held] {
        ballast.resize(mib << 20, 1);
        for i in (0..ballast.len()).step_by(4096) {
            ballast[i] = i as u8;
        }
        let (mut clone, mut fork) = (Vec::new(), Vec::new());
        rt.block_on(async {
            for _ in 0..samples {
                let t = Instant::now();
                let mut child = spawn::spawn(
                    &shim,
                    &[OsStr::new("--bad")],
                    Stdio::Null,
                    ChildSetup::default(),
                )
                .expect("spawn");
                clone.push(t.elapsed());
                child.wait().await.expect("wait");

                let t = Instant::now();
                let mut cmd = std::process::Command::new(&shim);
                cmd.arg("--bad")
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                // SAFETY: an empty hook; it only forces std onto fork.
                #[allow(unsafe_code)]
                unsafe {
                    cmd.pre_exec(|| Ok(()));
                }
                let mut child = cmd.spawn().expect("fork");
                fork.push(t.elapsed());
                child.wait().expect("wait");
            }
        });
        report(
            &format!("spawn/{mib} MiB held: clone(VM|VFORK)"),
            &clone,
            Some(("fork", &fork)),
        );
    }
    std::hint::black_box(&ballast);
}
