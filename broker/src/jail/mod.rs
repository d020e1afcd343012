//! A turn's jail on the host: its nsjail config and the rest of what the
//! broker knows about nsjail ([`nsjail`], re-exported here), its cgroup
//! ([`cgroup`]), the spawn of nsjail or the shim ([`spawn`]), and the ready
//! spares made ahead of turns ([`warm`]).

pub mod cgroup;
pub mod nsjail;
pub mod spawn;
pub mod warm;

pub use nsjail::*;
