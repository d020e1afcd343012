//! `turnstile doctor --config F`'s fleet checks: the database is
//! reachable, its schema is one this broker can use, and the archive store
//! can be written, read and deleted. Nothing is migrated or left behind.

use crate::db::{self, Db};
use crate::store::Archives;
use turnstile_broker::fleet::{FleetConfig, FleetError};

/// One check: what was found and, on failure, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetCheck {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    pub remedy: Option<String>,
}

fn pass(name: &'static str, detail: String) -> FleetCheck {
    FleetCheck {
        name,
        ok: true,
        detail,
        remedy: None,
    }
}

fn fail(name: &'static str, detail: String, remedy: &str) -> FleetCheck {
    FleetCheck {
        name,
        ok: false,
        detail,
        remedy: Some(remedy.to_string()),
    }
}

/// Runs every fleet check of `config`.
pub async fn checks(config: &FleetConfig) -> Vec<FleetCheck> {
    let mut out = Vec::new();
    if let Err(e) = config.validate() {
        out.push(fail(
            "fleet config",
            e,
            "fix the [fleet] table of the config file",
        ));
        return out;
    }
    out.push(pass(
        "fleet config",
        format!(
            "worker {}, lease TTL {} ms, keeping {} generations",
            config.worker_id(),
            config.lease_ttl_ms,
            config.keep_generations
        ),
    ));
    match Db::new(&config.database, db::STATEMENT_TIMEOUT) {
        Err(e) => out.push(fail(
            "fleet database",
            e.to_string(),
            "fix [fleet] database: a PostgreSQL URL such as postgres://user:password@host:5432/db",
        )),
        Ok(db) => match db.schema_version().await {
            Err(e) => out.push(fail(
                "fleet database",
                e.to_string(),
                "check that the server is up and reachable from this host, and the user, password and database in [fleet] database",
            )),
            Ok(found) => {
                out.push(pass("fleet database", format!("{} answers", db.shown())));
                out.push(schema_check(found));
            }
        },
    }
    out.push(match Archives::open(&config.archives) {
        Err(e) => fail(
            "archive store",
            e.to_string(),
            "fix [fleet] archives: file:///dir (existing), s3://bucket/prefix, gs://bucket/prefix or az://container/prefix",
        ),
        Ok(a) => match a.probe(&config.worker_id()).await {
            Ok(()) => pass(
                "archive store",
                format!("{}: write, read and delete work", a.url()),
            ),
            Err(e) => fail(
                "archive store",
                e.to_string(),
                "give this worker write, read and delete rights under the prefix; cloud credentials come from the AWS_*, GOOGLE_* or AZURE_* environment",
            ),
        },
    });
    out
}

fn schema_check(found: i32) -> FleetCheck {
    let known = db::SCHEMA_VERSION;
    if found > known {
        let e = FleetError::SchemaTooNew { found, known };
        return fail(
            "fleet schema",
            e.to_string(),
            "upgrade this broker to the version the other workers run",
        );
    }
    pass(
        "fleet schema",
        match found {
            0 => format!("none yet: the broker creates it (version {known}) at start"),
            f if f < known => format!("version {f}: the broker migrates it to {known} at start"),
            f => format!("version {f}, current"),
        },
    )
}
