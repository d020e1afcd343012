//! The turn's spec: a `Start` validated completely (ids, argv, environment,
//! cwd, lease policy) and its effective limits, before anything touches
//! disk. The rules for single fields are in [`crate::validate`], which the
//! session calls share.

use crate::Broker;
use crate::config::Limits;
use crate::disk::DiskLimit;
use crate::error::InputError;
use crate::profile::AgentProfile;
use crate::session::{LeasePolicy, now_unix_ms};
use crate::validate;
use std::sync::Arc;
use std::time::Duration;
use turnstile_proto::v1 as pb;

/// Default LLM bridge variable (of [`AgentProfile::default_pair`]).
pub const DEFAULT_LLM_ENV: &str = "ANTHROPIC_BASE_URL";

/// A validated `Start`. `Debug` never shows a credential: the upstream's
/// is held by its forwarder, whose `Debug` shows the URL only.
#[derive(Debug, Clone)]
pub struct TurnSpec {
    pub session_id: String,
    pub turn_id: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Normalised cwd relative to the work dir.
    pub cwd: String,
    pub limits: Limits,
    pub lease: LeasePolicy,
    pub llm_env_vars: Vec<String>,
    /// Variables set to the profile's placeholder credential.
    pub llm_credential_env_vars: Vec<String>,
    /// The agent profile (the default pair when `Start` names none).
    pub profile: Arc<AgentProfile>,
    /// `RLIMIT_FSIZE` from the session's disk limit: what is left of it.
    pub disk_file_cap: Option<u64>,
    /// The executor's idempotency key ("" for none).
    pub turn_key: String,
    /// How long the turn outlives its executor's stream.
    pub detach_grace_ms: u64,
    /// Broker-side forwarding (`Start.llm_upstream`): the turn's forwarder.
    pub llm_upstream: Option<crate::llm::upstream::TurnUpstream>,
}

/// A fresh unique id (turns, spool files).
pub fn new_turn_id() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("t-{:x}-{n:016x}", now_unix_ms())
}

/// Effective limits: 0 takes the broker's default; above the cap is refused.
pub fn effective_limits(
    req: Option<&pb::Limits>,
    defaults: &Limits,
    caps: &Limits,
) -> Result<Limits, InputError> {
    let req = req.cloned().unwrap_or_default();
    // Every field of `Limits`, by the name it has in the request, the
    // config and the error.
    macro_rules! limits {
        ($($field:ident),* $(,)?) => {
            Limits {
                $($field: pick(
                    stringify!($field),
                    req.$field,
                    defaults.$field,
                    caps.$field,
                )?,)*
            }
        };
    }
    Ok(limits!(
        wall_time_ms,
        memory_bytes,
        cpu_time_ms,
        max_processes,
        max_open_files,
        max_file_size_bytes,
        disk_bytes,
        disk_inodes,
    ))
}

/// One limit: `asked` (0 for the default) checked against the kernel's
/// range and the broker's cap.
fn pick(
    name: &'static str,
    asked: u64,
    default: Option<u64>,
    cap: Option<u64>,
) -> Result<Option<u64>, InputError> {
    if asked == 0 {
        return Ok(default);
    }
    // Whatever the broker's caps (even none), never past what the
    // kernel's types and the broker's arithmetic hold.
    let max = crate::config::limit_max(name);
    if asked > max {
        return Err(InputError::OverMax {
            name,
            value: asked,
            max,
        });
    }
    match cap {
        Some(cap) if asked > cap => Err(InputError::OverCap {
            name,
            value: asked,
            cap,
        }),
        _ => Ok(Some(asked)),
    }
}

impl TurnSpec {
    /// Validates a `Start` completely; nothing touches disk.
    pub fn from_start(mut start: pb::Start, broker: &Broker) -> Result<TurnSpec, InputError> {
        validate::session_id(&start.session_id)?;
        let turn_id = if start.turn_id.is_empty() {
            new_turn_id()
        } else {
            validate::turn_id(&start.turn_id)?;
            start.turn_id
        };
        validate::argv(&start.argv)?;
        let profile = if start.profile.is_empty() {
            AgentProfile::default_pair()
        } else {
            let profiles = &broker.config.profiles;
            profiles
                .get(&start.profile)
                .cloned()
                .ok_or_else(|| InputError::UnknownProfile {
                    name: start.profile.clone(),
                    known: profiles.names().join(", "),
                })?
        };
        // What `Start` names replaces the profile's list; a variable `Start`
        // names as a base-URL one leaves the profile's credential list.
        // Without a profile, base-URL variables named in `Start` come
        // without a placeholder unless `Start` names one too: the Anthropic
        // pair is for a `Start` that names neither.
        let own_vars = start.profile.is_empty() && !start.llm_env_vars.is_empty();
        let llm_env_vars = if start.llm_env_vars.is_empty() {
            profile.base_url_env.clone()
        } else {
            start.llm_env_vars
        };
        let llm_credential_env_vars = if own_vars || !start.llm_credential_env_vars.is_empty() {
            start.llm_credential_env_vars
        } else {
            let mut vars = profile.credential_env.clone();
            vars.retain(|v| !llm_env_vars.contains(v));
            vars
        };
        for v in llm_env_vars.iter().chain(&llm_credential_env_vars) {
            if !validate::is_env_key(v) || validate::is_protected_env(v) {
                return Err(InputError::LlmEnvVar(v.clone()));
            }
        }
        if let Some(v) = llm_credential_env_vars
            .iter()
            .find(|v| llm_env_vars.contains(v))
        {
            return Err(InputError::LlmVarTwice(v.clone()));
        }
        let mut env: Vec<(String, String)> = start.env.into_iter().collect();
        env.sort();
        for (k, v) in &env {
            validate::env_entry(k, v, &llm_env_vars)?;
        }
        let cwd = validate::cwd(&start.cwd)?;
        if !start.turn_key.is_empty() {
            validate::turn_key(&start.turn_key)?;
        }
        let detach_grace_ms = start
            .detach_grace_ms
            .unwrap_or(broker.config.detach_grace_ms);
        if detach_grace_ms > crate::config::MAX_DURATION_MS {
            return Err(InputError::DetachGrace(detach_grace_ms));
        }
        let limits = effective_limits(
            start.limits.as_ref(),
            &broker.config.default_limits,
            &broker.config.max_limits,
        )?;
        let lease = match start.lease {
            Some(l) if l.policy == pb::lease::Policy::Wait as i32 => {
                LeasePolicy::Wait(Duration::from_millis(l.wait_ms))
            }
            _ => LeasePolicy::Reject,
        };
        let llm_upstream = match start.llm_upstream.as_mut() {
            Some(up) => Some(turn_upstream(up, &profile, broker)?),
            None => None,
        };
        let disk_file_cap = broker
            .disk
            .file_size_cap(&start.session_id, disk_limit(&limits));
        Ok(TurnSpec {
            disk_file_cap,
            session_id: start.session_id,
            turn_id,
            argv: start.argv,
            env,
            cwd,
            limits,
            lease,
            llm_env_vars,
            llm_credential_env_vars,
            profile: Arc::new(profile),
            turn_key: start.turn_key,
            detach_grace_ms,
            llm_upstream,
        })
    }

    /// What makes two `Start`s with one key the same turn: a hash of argv,
    /// env and cwd (hex SHA-256; env values may hold secrets, so only the
    /// hash is ever written down).
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        for a in &self.argv {
            field(a.as_bytes());
        }
        field(b"\0env");
        for (k, v) in &self.env {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        field(b"\0cwd");
        field(self.cwd.as_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The forwarder of a `Start`'s upstream (its credential moved out of the
/// message into the forwarder).
fn turn_upstream(
    up: &mut pb::LlmUpstream,
    profile: &AgentProfile,
    broker: &Broker,
) -> Result<crate::llm::upstream::TurnUpstream, InputError> {
    use crate::llm::upstream::{TurnUpstream, UpstreamError, UpstreamSpec};
    let spec = UpstreamSpec::take(up, profile.credential_header)?;
    let upstreams = broker
        .llm_upstreams()
        .ok_or(InputError::Upstream(UpstreamError::Unsupported))?;
    let forwarder = upstreams.forwarder(&spec).map_err(|why| {
        InputError::Upstream(UpstreamError::Url {
            url: spec.base_url.clone(),
            why,
        })
    })?;
    Ok(TurnUpstream {
        base_url: spec.base_url.clone(),
        forwarder,
    })
}

/// The session disk limit within a turn's limits.
pub fn disk_limit(limits: &Limits) -> DiskLimit {
    DiskLimit {
        bytes: limits.disk_bytes,
        inodes: limits.disk_inodes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_cap_and_refuse() {
        let defaults = Limits {
            wall_time_ms: Some(10),
            ..Limits::unlimited()
        };
        let caps = Limits {
            wall_time_ms: Some(100),
            memory_bytes: Some(1000),
            ..Limits::unlimited()
        };
        let got = effective_limits(None, &defaults, &caps).expect("defaults");
        assert_eq!(got.wall_time_ms, Some(10));
        assert_eq!(got.memory_bytes, None);
        let req = pb::Limits {
            wall_time_ms: 100,
            cpu_time_ms: 5,
            ..Default::default()
        };
        let got = effective_limits(Some(&req), &defaults, &caps).expect("at cap");
        assert_eq!(got.wall_time_ms, Some(100));
        assert_eq!(got.cpu_time_ms, Some(5));
        let req = pb::Limits {
            memory_bytes: 1001,
            ..Default::default()
        };
        assert_eq!(
            effective_limits(Some(&req), &defaults, &caps),
            Err(InputError::OverCap {
                name: "memory_bytes",
                value: 1001,
                cap: 1000
            })
        );
    }

    #[test]
    fn every_limit_is_picked_by_its_own_name() {
        // Field i has cap i + 1. Asked at their caps all are granted; one
        // over its cap is refused under its own name; 0 takes its own
        // default. No field reads another's request, default or cap.
        let limits = |v: [u64; 8]| Limits {
            wall_time_ms: Some(v[0]),
            memory_bytes: Some(v[1]),
            cpu_time_ms: Some(v[2]),
            max_processes: Some(v[3]),
            max_open_files: Some(v[4]),
            max_file_size_bytes: Some(v[5]),
            disk_bytes: Some(v[6]),
            disk_inodes: Some(v[7]),
        };
        let request = |v: [u64; 8]| pb::Limits {
            wall_time_ms: v[0],
            memory_bytes: v[1],
            cpu_time_ms: v[2],
            max_processes: v[3],
            max_open_files: v[4],
            max_file_size_bytes: v[5],
            disk_bytes: v[6],
            disk_inodes: v[7],
        };
        let at_cap = [1, 2, 3, 4, 5, 6, 7, 8];
        let caps = limits(at_cap);
        let none = Limits::unlimited();
        let got = effective_limits(Some(&request(at_cap)), &none, &caps);
        assert_eq!(got, Ok(caps.clone()));
        for (i, (name, _)) in caps.entries().into_iter().enumerate() {
            let mut over = at_cap;
            over[i] += 1;
            match effective_limits(Some(&request(over)), &none, &caps) {
                Err(InputError::OverCap { name: got, .. }) => assert_eq!(got, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(effective_limits(None, &caps, &none), Ok(caps));
    }
}
