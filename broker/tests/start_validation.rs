//! Property tests of `Start` validation: whatever ids, argv, environment,
//! cwd, limits and sizes an executor sends, the broker never panics; a
//! `Start` is admitted exactly when every field is valid, and a refusal is
//! `InvalidArgument` (or `ResourceExhausted` for a payload over its cap)
//! with a message naming the field.

use proptest::collection::vec;
use proptest::prelude::*;
use std::sync::Arc;
use tonic::Code;
use turnstile_broker::Broker;
use turnstile_broker::config::{CgroupPolicy, Config, DiskBackend, Limits, Mode, limit_max};
use turnstile_broker::error::{BrokerError, InputError};
use turnstile_broker::turn::{TurnPaths, TurnSpec, build_payload};
use turnstile_proto::v1 as pb;

/// Cap on the init payload of the broker under test: small, so that random
/// sizes fall on both sides of it.
const PAYLOAD_CAP: usize = 64 * 1024;

const LIMIT_FIELDS: [&str; 8] = [
    "wall_time_ms",
    "memory_bytes",
    "cpu_time_ms",
    "max_processes",
    "max_open_files",
    "max_file_size_bytes",
    "disk_bytes",
    "disk_inodes",
];

/// A direct-mode broker on a temp state dir; nothing is spawned.
fn broker() -> (tempfile::TempDir, Arc<Broker>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config {
        state_dir: dir.path().join("state"),
        mode: Mode::Direct,
        // Never run: validation touches nothing.
        shim: "/bin/true".into(),
        cgroups: CgroupPolicy::Off,
        warm_spares: 0,
        disk_reserve_bytes: Some(0),
        // Nothing to mount: validation reads no session.
        disk_backend: DiskBackend::Accounting,
        max_payload_bytes: PAYLOAD_CAP,
        ..Config::default()
    };
    let broker = Broker::new(cfg).expect("broker");
    (dir, broker)
}

// --- What a valid field is, written from the API's documentation (the
// proto file and the error messages), not from the code under test.

fn id_ok(id: &str) -> bool {
    let b = id.as_bytes();
    (1..=128).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
        && !id.contains("..")
}

fn env_key_ok(k: &str) -> bool {
    let b = k.as_bytes();
    (1..=256).contains(&b.len())
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

fn protected(k: &str) -> bool {
    ["HOME", "USER", "LOGNAME", "PWD", "TMPDIR"].contains(&k) || k.starts_with("TURNSTILE_")
}

fn env_value_ok(v: &str) -> bool {
    v.chars().all(|c| c == '\t' || !c.is_control())
}

fn cwd_ok(c: &str) -> bool {
    !c.starts_with('/')
        && c.len() <= 4096
        && !c.chars().any(char::is_control)
        && !c.split('/').any(|p| p == "..")
}

/// The fields of `start` that are invalid, by the name its error uses.
fn invalid_fields(start: &pb::Start) -> Vec<String> {
    let mut bad = Vec::new();
    if !id_ok(&start.session_id) {
        bad.push("session id".to_string());
    }
    if !start.turn_id.is_empty() && !id_ok(&start.turn_id) {
        bad.push("turn id".to_string());
    }
    if start.argv.first().is_none_or(String::is_empty)
        || start.argv.iter().any(|a| a.contains('\0'))
    {
        bad.push("argv".to_string());
    }
    let llm_vars: Vec<String> = if start.llm_env_vars.is_empty() {
        vec!["ANTHROPIC_BASE_URL".to_string()]
    } else {
        start.llm_env_vars.clone()
    };
    for v in &start.llm_env_vars {
        if !env_key_ok(v) || protected(v) {
            bad.push(format!("llm env var {v:?}"));
        }
    }
    for (k, v) in &start.env {
        if !env_key_ok(k) {
            bad.push(format!("env key {k:?}"));
        } else if protected(k) || llm_vars.contains(k) {
            bad.push(format!("env key {k} is protected"));
        } else if !env_value_ok(v) {
            bad.push(format!("env value of {k}"));
        }
    }
    if !cwd_ok(&start.cwd) {
        bad.push("cwd".to_string());
    }
    if !start.turn_key.is_empty() && !id_ok(&start.turn_key) {
        bad.push("turn key".to_string());
    }
    if start
        .detach_grace_ms
        .is_some_and(|g| g > turnstile_broker::config::MAX_DURATION_MS)
    {
        bad.push("detach_grace_ms".to_string());
    }
    if let Some(l) = &start.limits {
        let caps = Limits::default_caps();
        let asked = [
            l.wall_time_ms,
            l.memory_bytes,
            l.cpu_time_ms,
            l.max_processes,
            l.max_open_files,
            l.max_file_size_bytes,
            l.disk_bytes,
            l.disk_inodes,
        ];
        for ((name, v), (_, cap)) in LIMIT_FIELDS.iter().zip(asked).zip(caps.entries()) {
            if v > limit_max(name) || cap.is_some_and(|c| v > c) {
                bad.push(format!("limit {name} = {v}"));
            }
        }
    }
    bad
}

// --- Generators: for each field a valid value and a hostile one (which
// may turn out valid too); each Start takes a few fields hostile.

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9._-]{0,20}".prop_filter("no ..", |s| !s.contains(".."))
}

fn hostile_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9]{127,130}",
        Just(String::new()),
        Just("..".to_string()),
        Just("a..b".to_string()),
        "[./\\\\a-z\0\n é-]{0,8}",
        ".{0,12}",
    ]
}

fn env_key() -> impl Strategy<Value = String> {
    "[A-Za-z_][A-Za-z0-9_]{0,12}".prop_filter("not protected", |k| {
        !protected(k) && k != "ANTHROPIC_BASE_URL" && k != "OPENAI_BASE_URL"
    })
}

fn hostile_env_key() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(vec![
            "HOME",
            "USER",
            "LOGNAME",
            "PWD",
            "TMPDIR",
            "TURNSTILE_X",
            "ANTHROPIC_BASE_URL",
            "OPENAI_BASE_URL",
        ])
        .prop_map(str::to_string),
        "[A-Z]{255,258}",
        Just(String::new()),
        "[0-9=. -][A-Z]{0,4}",
        ".{0,8}",
    ]
}

fn env_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[ -~\t]{0,24}",
        // Large values: the payload cap is reached by size, not by count.
        1 => (0usize..PAYLOAD_CAP).prop_map(|n| "v".repeat(n)),
    ]
}

fn hostile_env_value() -> impl Strategy<Value = String> {
    prop_oneof![".{0,12}", "[a\0\n\r\u{1b}\u{7f}\u{85}]{1,4}"]
}

fn env(hostile: bool) -> BoxedStrategy<Vec<(String, String)>> {
    let good = vec((env_key(), env_value()), 0..5);
    if !hostile {
        return good.boxed();
    }
    let bad = prop_oneof![
        (hostile_env_key(), env_value()),
        (env_key(), hostile_env_value()),
    ];
    (good, vec(bad, 1..3))
        .prop_map(|(mut g, b)| {
            g.extend(b);
            g
        })
        .boxed()
}

fn argv(hostile: bool) -> BoxedStrategy<Vec<String>> {
    let arg = prop_oneof![
        6 => "[ -~]{0,16}",
        1 => (0usize..PAYLOAD_CAP).prop_map(|n| "a".repeat(n)),
    ];
    let good = ("[a-z/]{1,12}", vec(arg.clone(), 0..4)).prop_map(|(p, mut rest)| {
        rest.insert(0, p);
        rest
    });
    if !hostile {
        return good.boxed();
    }
    prop_oneof![
        Just(Vec::new()),
        vec(arg, 0..3).prop_map(|mut v| {
            v.insert(0, String::new());
            v
        }),
        (good, "[a\0]{1,3}", any::<prop::sample::Index>()).prop_map(|(mut v, nul, at)| {
            let i = at.index(v.len() + 1);
            v.insert(i, format!("{nul}\0"));
            v
        }),
        vec(".{0,8}", 0..3),
    ]
    .boxed()
}

fn cwd(hostile: bool) -> BoxedStrategy<String> {
    if !hostile {
        return "([a-z.]{1,4}/){0,4}[a-z]{0,4}"
            .prop_filter("no ..", |c| !c.split('/').any(|p| p == ".."))
            .boxed();
    }
    prop_oneof![
        Just("..".to_string()),
        Just("a/../b".to_string()),
        "/[a-z/]{0,8}",
        ".{0,10}",
        (4090usize..4100).prop_map(|n| "c".repeat(n)),
    ]
    .boxed()
}

fn llm_env_vars(hostile: bool) -> BoxedStrategy<Vec<String>> {
    if !hostile {
        return prop_oneof![
            3 => Just(Vec::new()),
            1 => vec(env_key(), 1..3),
        ]
        .boxed();
    }
    (vec(env_key(), 0..2), hostile_env_key())
        .prop_map(|(mut v, bad)| {
            v.push(bad);
            v
        })
        .boxed()
}

fn limit(name: &'static str, hostile: bool) -> BoxedStrategy<u64> {
    let max = limit_max(name);
    if !hostile {
        return prop_oneof![3 => Just(0u64), 1 => 1u64..(1 << 20)].boxed();
    }
    prop_oneof![
        (max - 1)..=max.saturating_add(1),
        any::<u64>(),
        Just(u64::MAX),
    ]
    .boxed()
}

fn limits(hostile: bool) -> BoxedStrategy<Option<pb::Limits>> {
    let l = |name| limit(name, hostile);
    (
        (l("wall_time_ms"), l("memory_bytes"), l("cpu_time_ms")),
        (
            l("max_processes"),
            l("max_open_files"),
            l("max_file_size_bytes"),
        ),
        (l("disk_bytes"), l("disk_inodes")),
    )
        .prop_map(|((w, m, c), (p, o, f), (d, i))| {
            Some(pb::Limits {
                wall_time_ms: w,
                memory_bytes: m,
                cpu_time_ms: c,
                max_processes: p,
                max_open_files: o,
                max_file_size_bytes: f,
                disk_bytes: d,
                disk_inodes: i,
            })
        })
        .boxed()
}

fn start() -> impl Strategy<Value = pb::Start> {
    // Which fields are hostile: about one in eight each.
    vec(prop::bool::weighted(0.12), 8).prop_flat_map(|h| {
        let either = |hostile: bool| -> BoxedStrategy<String> {
            if hostile {
                hostile_id().boxed()
            } else {
                id().boxed()
            }
        };
        (
            either(h[0]),
            if h[1] {
                hostile_id().boxed()
            } else {
                prop_oneof![Just(String::new()), id()].boxed()
            },
            argv(h[2]),
            env(h[3]),
            cwd(h[4]),
            llm_env_vars(h[5]),
            prop_oneof![1 => Just(None), 3 => limits(h[6])],
            proptest::option::of((0i32..3, any::<u64>())),
            (
                if h[7] {
                    hostile_id().boxed()
                } else {
                    prop_oneof![Just(String::new()), id()].boxed()
                },
                proptest::option::of(prop_oneof![
                    0u64..=turnstile_broker::config::MAX_DURATION_MS,
                    any::<u64>()
                ]),
            ),
        )
            .prop_map(
                |(
                    session_id,
                    turn_id,
                    argv,
                    env,
                    cwd,
                    llm_env_vars,
                    limits,
                    lease,
                    (turn_key, detach_grace_ms),
                )| pb::Start {
                    session_id,
                    turn_id,
                    argv,
                    env: env.into_iter().collect(),
                    cwd,
                    llm_env_vars,
                    limits,
                    lease: lease.map(|(policy, wait_ms)| pb::Lease { policy, wait_ms }),
                    turn_key,
                    detach_grace_ms,
                    ..Default::default()
                },
            )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn any_start_is_admitted_exactly_when_valid_and_refusals_name_the_field(start in start()) {
        thread_local! {
            static BROKER: (tempfile::TempDir, Arc<Broker>) = broker();
        }
        let bad = invalid_fields(&start);
        let broker = BROKER.with(|b| b.1.clone());
        match TurnSpec::from_start(start.clone(), &broker) {
            Ok(spec) => {
                prop_assert!(bad.is_empty(), "admitted with {:?}: {:?}", bad, start);
                prop_assert_eq!(&spec.session_id, &start.session_id);
                prop_assert_eq!(&spec.argv, &start.argv);
                prop_assert!(id_ok(&spec.turn_id), "{}", spec.turn_id);
                for (name, v) in spec.limits.entries() {
                    prop_assert!(v.is_none_or(|v| v <= limit_max(name)), "{} = {:?}", name, v);
                }
                // The payload: within its cap, or refused as too large
                // (never cut), and the refusal says what counts.
                let paths = TurnPaths::new(&broker, &spec);
                match build_payload(&broker, &spec, &paths) {
                    Ok(bytes) => prop_assert!(bytes.len() <= PAYLOAD_CAP),
                    Err(e @ BrokerError::PayloadTooLarge { .. }) => {
                        prop_assert_eq!(e.code(), Code::ResourceExhausted);
                        prop_assert!(e.to_string().contains("argv, env and cwd"), "{}", e);
                    }
                    Err(e) => prop_assert!(false, "{}", e),
                }
            }
            Err(e) => {
                // Each kind of refusal carries the value it refused.
                let named = match &e {
                    InputError::SessionId(v) => *v == start.session_id,
                    InputError::TurnId(v) => *v == start.turn_id,
                    InputError::TurnKey(v) => *v == start.turn_key,
                    InputError::DetachGrace(v) => Some(*v) == start.detach_grace_ms,
                    InputError::Cwd(v) => *v == start.cwd,
                    InputError::ArgvNul(i) => start.argv.get(*i).is_some_and(|a| a.contains('\0')),
                    InputError::EnvKey(k) | InputError::ProtectedEnv(k) | InputError::EnvValue(k) => {
                        start.env.contains_key(k)
                    }
                    InputError::LlmEnvVar(v) | InputError::LlmVarTwice(v) => {
                        start.llm_env_vars.contains(v) || start.llm_credential_env_vars.contains(v)
                    }
                    InputError::UnknownProfile { name, .. } => *name == start.profile,
                    InputError::Upstream(_) => start.llm_upstream.is_some(),
                    InputError::EmptyArgv => start.argv.first().is_none_or(String::is_empty),
                    InputError::OverMax { value, .. } | InputError::OverCap { value, .. } => *value > 0,
                };
                prop_assert!(named, "{:?} for {:?}", e, start);
                let status = tonic::Status::from(BrokerError::Input(e));
                prop_assert_eq!(status.code(), Code::InvalidArgument);
                let msg = status.message();
                prop_assert!(
                    bad.iter().any(|field| msg.contains(field.as_str())),
                    "refusal {:?} names none of the invalid fields {:?}", msg, bad
                );
            }
        }
    }
}
