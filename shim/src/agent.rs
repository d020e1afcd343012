//! The agent's exec plan: argv, environment, PATH candidates, working
//! directory and limits, laid out from the init payload before the shim
//! tells the broker it is ready (the plan is the payload's last
//! validation), and the agent's start through `turnstile-sys`'s one
//! vfork-style spawn.

use nix::sys::resource::Resource;
use std::ffi::CString;
use turnstile_shim::InitPayload;
use turnstile_sys::{ChildPlan, Rlimit, SpawnError};

/// Everything the child touches between its clone and `execve`, built
/// before: the child must not allocate (it shares the shim's memory, and
/// another thread may hold the malloc lock), so strings are C strings ready
/// to pass.
#[derive(Debug)]
pub struct ExecPlan {
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// Paths to try with `execve`, in order (`execvpe` over the agent's PATH).
    candidates: Vec<CString>,
    cwd: CString,
    rlimits: Vec<Rlimit>,
    /// Direct mode: own process group, parent-death signal.
    direct: bool,
}

impl ExecPlan {
    /// Checks that every string can become a C string and lays out argv,
    /// the environment (exactly the payload's, in order) and the PATH
    /// candidates for `argv[0]`.
    pub fn new(payload: &InitPayload) -> Result<Self, String> {
        let cstr = |what: &str, s: &str| {
            CString::new(s).map_err(|_| format!("init payload {what} contains a NUL byte"))
        };
        let argv = payload
            .argv
            .iter()
            .map(|a| cstr("argv", a))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = env_entries(&payload.env)?
            .iter()
            .map(|e| cstr("env", e))
            .collect::<Result<Vec<_>, _>>()?;
        // The bridge's variables are set later (`set_env`), once its port is
        // known; their names are checked now, before the self-check.
        if let Some(llm) = &payload.llm {
            for key in &llm.env_vars {
                check_env_key(key)?;
                cstr("llm env var", key)?;
            }
        }
        let argv0 = payload.argv.first().map(String::as_str).unwrap_or_default();
        let path = payload
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str());
        let candidates = exec_candidates(argv0, path)
            .iter()
            .map(|c| cstr("argv[0]", c))
            .collect::<Result<Vec<_>, _>>()?;
        let r = &payload.rlimits;
        let rlimits = [
            (Resource::RLIMIT_CPU, r.cpu_seconds),
            (Resource::RLIMIT_NOFILE, r.open_files),
            (Resource::RLIMIT_FSIZE, r.file_size_bytes),
            (Resource::RLIMIT_AS, r.address_space_bytes),
            (Resource::RLIMIT_NPROC, r.processes),
        ]
        .into_iter()
        .filter_map(|(resource, v)| v.map(|v| rlimit(resource, v)))
        .collect();
        Ok(ExecPlan {
            argv,
            envp,
            candidates,
            cwd: cstr("cwd", &payload.cwd)?,
            rlimits,
            direct: payload.mode == turnstile_shim::Mode::Direct,
        })
    }

    /// Sets `key=value` in the agent's environment: replaces the first entry
    /// with that key in place (dropping any later duplicate), or appends it.
    /// Shim only, before the clone. The PATH candidates for `argv[0]` stay
    /// the ones computed from the payload's PATH.
    pub fn set_env(&mut self, key: &str, value: &str) -> Result<(), String> {
        check_env_key(key)?;
        let entry = CString::new(format!("{key}={value}"))
            .map_err(|_| format!("environment entry {key} contains a NUL byte"))?;
        let mut entry = Some(entry);
        let prefix = format!("{key}=");
        self.envp.retain_mut(|e| {
            if !e.as_bytes().starts_with(prefix.as_bytes()) {
                return true;
            }
            match entry.take() {
                Some(new) => {
                    *e = new;
                    true
                }
                None => false,
            }
        });
        if let Some(new) = entry {
            self.envp.push(new);
        }
        Ok(())
    }

    /// The name of the `i`th limit applied, for error messages.
    pub fn rlimit_name(&self, i: usize) -> &'static str {
        match self.rlimits.get(i).map(|limit| limit.resource) {
            Some(Resource::RLIMIT_CPU) => "cpu",
            Some(Resource::RLIMIT_NOFILE) => "open files",
            Some(Resource::RLIMIT_FSIZE) => "file size",
            Some(Resource::RLIMIT_AS) => "address space",
            Some(Resource::RLIMIT_NPROC) => "processes",
            _ => "resource",
        }
    }
}

/// `KEY=VALUE` strings of the agent's environment; refuses keys that would
/// make the environment ambiguous.
pub fn env_entries(env: &[(String, String)]) -> Result<Vec<String>, String> {
    env.iter()
        .map(|(k, v)| check_env_key(k).map(|()| format!("{k}={v}")))
        .collect()
}

/// An environment key must be non-empty and free of `=`.
fn check_env_key(k: &str) -> Result<(), String> {
    if k.is_empty() || k.contains('=') {
        Err(format!("init payload has an invalid env key {k:?}"))
    } else {
        Ok(())
    }
}

/// The paths `execvpe` would try for `name`: the name itself if it has a
/// slash, else each PATH entry joined with it (glibc's default PATH when the
/// agent has none; an empty entry is the working directory).
pub fn exec_candidates(name: &str, path: Option<&str>) -> Vec<String> {
    if name.contains('/') {
        return vec![name.to_string()];
    }
    path.unwrap_or("/bin:/usr/bin")
        .split(':')
        .map(|dir| {
            if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            }
        })
        .collect()
}

/// A limit for the agent. CPU: the kernel sends SIGXCPU at the soft limit
/// and SIGKILL at the hard one; with both equal SIGKILL wins and the cause
/// is lost. One second of headroom lets SIGXCPU arrive first (and an agent
/// that traps it a moment to save its state).
fn rlimit(resource: Resource, value: u64) -> Rlimit {
    let hard = if resource == Resource::RLIMIT_CPU {
        value.saturating_add(1)
    } else {
        value
    };
    Rlimit {
        resource,
        soft: value,
        hard,
    }
}

/// Shim only, and from the main thread: the agent's parent-death signal
/// (direct mode) fires when the thread that cloned it exits. Starts the
/// agent with the shim's own stdio and returns its pid once it has
/// executed; a child that failed has been reaped. The steps and their
/// order are [`turnstile_sys::spawn`]'s: signals reset; in direct mode the
/// parent-death signal, then a check that the shim is still there, and a
/// process group of its own, so that one `killpg` reaches every descendant
/// that does not leave it; the limits, after everything they could
/// disturb; the working directory; `execve` over the PATH candidates.
pub fn spawn(plan: &ExecPlan) -> Result<i32, SpawnError> {
    turnstile_sys::spawn(&ChildPlan {
        programs: &plan.candidates,
        argv: &plan.argv,
        envp: &plan.envp,
        parent_death_signal: plan.direct,
        cgroup_procs: &[],
        process_group: plan.direct,
        fds: &[],
        rlimits: &plan.rlimits,
        cwd: &plan.cwd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_follow_execvp() {
        assert_eq!(exec_candidates("/bin/sh", Some("/x")), ["/bin/sh"]);
        assert_eq!(exec_candidates("./a", None), ["./a"]);
        assert_eq!(
            exec_candidates("claude", Some("/opt/bin::/usr/bin")),
            ["/opt/bin/claude", "claude", "/usr/bin/claude"]
        );
        assert_eq!(exec_candidates("sh", None), ["/bin/sh", "/usr/bin/sh"]);
    }

    #[test]
    fn env_entries_keep_order_and_refuse_bad_keys() {
        let env = vec![
            ("PATH".to_string(), "/bin".to_string()),
            ("A".to_string(), "x=y".to_string()),
        ];
        assert_eq!(env_entries(&env).expect("valid"), ["PATH=/bin", "A=x=y"]);
        assert!(env_entries(&[("A=B".into(), "c".into())]).is_err());
        assert!(env_entries(&[(String::new(), "c".into())]).is_err());
    }

    /// A direct-mode payload running `sh` in `/` with `env`.
    fn test_payload(env: Vec<(String, String)>) -> InitPayload {
        InitPayload {
            version: turnstile_shim::PROTOCOL_VERSION,
            mode: turnstile_shim::Mode::Direct,
            session_id: "s".into(),
            turn_id: "t".into(),
            argv: vec!["sh".into()],
            env,
            cwd: "/".into(),
            rlimits: turnstile_shim::Rlimits::default(),
            llm: None,
        }
    }

    #[test]
    fn set_env_replaces_in_place_or_appends() {
        let mut payload = test_payload(vec![
            ("A".into(), "1".into()),
            ("URL".into(), "old".into()),
            ("URLX".into(), "keep".into()),
            ("URL".into(), "dup".into()),
        ]);
        payload.llm = Some(turnstile_shim::LlmBridge {
            port: 0,
            socket_path: "/s".into(),
            env_vars: vec!["URL".into(), "NEW".into()],
            url_path: String::new(),
        });
        let mut plan = ExecPlan::new(&payload).expect("valid plan");
        plan.set_env("URL", "http://127.0.0.1:9").expect("set");
        plan.set_env("NEW", "http://127.0.0.1:9").expect("set");
        let env: Vec<_> = plan
            .envp
            .iter()
            .map(|e| e.to_str().expect("utf-8"))
            .collect();
        assert_eq!(
            env,
            [
                "A=1",
                "URL=http://127.0.0.1:9",
                "URLX=keep",
                "NEW=http://127.0.0.1:9"
            ]
        );
        assert!(plan.set_env("A=B", "x").is_err());
        for bad in ["", "A=B", "A\0B"] {
            if let Some(llm) = payload.llm.as_mut() {
                llm.env_vars = vec![bad.into()];
            }
            assert!(ExecPlan::new(&payload).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn plan_refuses_nul_bytes() {
        let mut payload = test_payload(vec![("PATH".into(), "/usr/bin:/bin".into())]);
        payload.rlimits.file_size_bytes = Some(10);
        let plan = ExecPlan::new(&payload).expect("valid plan");
        assert_eq!(plan.candidates.len(), 2);
        assert_eq!(plan.rlimit_name(0), "file size");
        payload.argv.push("a\0b".into());
        assert!(ExecPlan::new(&payload).is_err());
    }
}
