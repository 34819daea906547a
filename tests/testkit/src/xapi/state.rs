//! The world kept in a JSON file between calls of the fake `xe`.

use super::World;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A world and the wall-clock origin its times count from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimState {
    /// Unix time (ms) of the world's time zero.
    pub origin_unix_ms: u64,
    /// The pool.
    pub world: World,
    /// Unix time (ms) of the last bus event already told to the world.
    #[serde(default)]
    pub bus_seen_unix_ms: u64,
}

impl SimState {
    /// A state whose time zero is now.
    pub fn starting_now(world: World) -> Self {
        SimState {
            origin_unix_ms: unix_ms(),
            world,
            bus_seen_unix_ms: 0,
        }
    }

    /// The world's "now": wall clock minus the origin.
    pub fn now(&self) -> Duration {
        Duration::from_millis(unix_ms().saturating_sub(self.origin_unix_ms))
    }

    /// Read a state file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read simulated XAPI state {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("bad simulated XAPI state {}", path.display()))
    }

    /// Write a state file atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
