//! Firmware images: the manifest of known images (pinned SHA-256), where the
//! image to upload comes from, and verification before any USB traffic.
//!
//! Contract (implementation to follow):
//! - `manifest() -> &'static [ManifestEntry]`, parsed from `firmware/manifest.txt`.
//! - `load(&FirmwareChoice) -> anyhow::Result<FirmwareImage>`: `--firmware`,
//!   env `CORAL_FIRMWARE`, `/var/lib/coral/<name>`, the embedded image.

use std::path::PathBuf;

/// Where an image came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirmwareSource {
    /// `--firmware PATH`.
    Flag(PathBuf),
    /// env `CORAL_FIRMWARE`.
    Env(PathBuf),
    /// An installed copy under the install directory.
    Installed(PathBuf),
    /// Embedded at build time (`CORAL_EMBED_FIRMWARE`).
    Embedded,
}

/// A loaded image, checksummed.
#[derive(Clone, Debug)]
pub struct FirmwareImage {
    /// The bytes to upload.
    pub bytes: Vec<u8>,
    /// Lower-case hex SHA-256 of `bytes`.
    pub sha256: String,
    /// Where it came from.
    pub source: FirmwareSource,
    /// The manifest entry it matches, if any.
    pub known_name: Option<String>,
}

/// How to choose an image.
#[derive(Clone, Debug)]
pub struct FirmwareChoice {
    /// `--firmware`, if given.
    pub explicit: Option<PathBuf>,
    /// `--allow-unknown-firmware`.
    pub allow_unknown: bool,
    /// Where installed copies live (default `/var/lib/coral`).
    pub install_dir: PathBuf,
}
