//! Firmware images: the manifest of known images (pinned SHA-256), where the
//! image to upload comes from, and verification before any USB traffic.
//!
//! CONTRACT (bodies to be written): `manifest()`, `load()`.

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

/// Default directory of installed images.
pub const DEFAULT_INSTALL_DIR: &str = "/var/lib/coral";

/// One known image (a line of `firmware/manifest.txt`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    /// File name, e.g. `apex_latest_single_ep.bin`.
    pub name: String,
    /// Size in bytes.
    pub size: usize,
    /// Lower-case hex SHA-256.
    pub sha256: String,
    /// Upstream URL at the pinned libedgetpu commit.
    pub url: String,
}

/// The known images (the default image first).
pub fn manifest() -> &'static [ManifestEntry] {
    todo!("firmware::manifest")
}

/// Load and verify the image to upload: `--firmware`, env `CORAL_FIRMWARE`,
/// an installed copy under `install_dir`, the embedded image. An unknown
/// checksum is refused (`FailureKind::Firmware`) unless `allow_unknown`; no
/// image at all → an error saying exactly how to get one.
pub fn load(choice: &FirmwareChoice) -> anyhow::Result<FirmwareImage> {
    let _ = choice;
    todo!("firmware::load")
}
