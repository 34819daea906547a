//! Firmware images: the manifest of known images (pinned SHA-256), where the
//! image to upload comes from, and verification before any USB traffic.
//!

use crate::error::{fail_then, FailureKind, Flag, NextStep};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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
    /// `--simulate` without any image: a stand-in the simulated Coral accepts.
    Simulated,
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
    /// Where installed copies live (default [`crate::DATA_DIR`]).
    pub install_dir: PathBuf,
}

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

/// Largest image accepted at all (the real ones are ~11 KB).
const MAX_IMAGE_BYTES: u64 = 1 << 20;

/// Env var naming an image (after `--firmware`).
pub const FIRMWARE_ENV: &str = "CORAL_FIRMWARE";

/// The known images (the default image first).
pub fn manifest() -> &'static [ManifestEntry] {
    static MANIFEST: OnceLock<Vec<ManifestEntry>> = OnceLock::new();
    MANIFEST.get_or_init(|| {
        include_str!("../firmware/manifest.txt")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some(ManifestEntry {
                    name: f.next()?.to_string(),
                    size: f.next()?.parse().ok()?,
                    sha256: f.next()?.to_string(),
                    url: f.next()?.to_string(),
                })
            })
            .collect()
    })
}

/// The manifest entry with this SHA-256.
pub fn known(sha256: &str) -> Option<&'static ManifestEntry> {
    manifest().iter().find(|e| e.sha256 == sha256)
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The image embedded at build time, if any.
fn embedded() -> Option<&'static [u8]> {
    #[cfg(coral_embedded_firmware)]
    {
        Some(include_bytes!(concat!(
            env!("OUT_DIR"),
            "/embedded_firmware.bin"
        )))
    }
    #[cfg(not(coral_embedded_firmware))]
    {
        None
    }
}

/// What to say when no image is found anywhere: where it was looked for,
/// then how to get one.
pub fn how_to_get_one(install_dir: &Path) -> String {
    format!("{}; {}", not_found(install_dir), get_firmware(install_dir))
}

/// The next step when no image is found: fetch one, or install a copy into `install_dir`.
pub fn get_firmware(install_dir: &Path) -> NextStep {
    NextStep::GetFirmware {
        dir: install_dir.display().to_string(),
    }
}

/// Where an image was looked for, in vain.
fn not_found(install_dir: &Path) -> String {
    format!(
        "no Coral firmware image found ({}, ${FIRMWARE_ENV}, {}/{}, none embedded)",
        Flag::Firmware,
        install_dir.display(),
        manifest()
            .first()
            .map(|e| e.name.as_str())
            .unwrap_or("apex_latest_single_ep.bin")
    )
}

/// Load and verify the image to upload: `--firmware`, env `CORAL_FIRMWARE`,
/// an installed copy under `install_dir`, the embedded image. An unknown
/// checksum is refused (`FailureKind::Firmware`) unless `allow_unknown`; no
/// image at all → an error saying exactly how to get one.
pub fn load(choice: &FirmwareChoice) -> anyhow::Result<FirmwareImage> {
    if let Some(path) = &choice.explicit {
        return read_verified(
            path,
            FirmwareSource::Flag(path.clone()),
            choice.allow_unknown,
        );
    }
    if let Some(path) = std::env::var_os(FIRMWARE_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return read_verified(
            &path,
            FirmwareSource::Env(path.clone()),
            choice.allow_unknown,
        );
    }
    for entry in manifest() {
        let path = choice.install_dir.join(&entry.name);
        if path.exists() {
            return read_verified(
                &path,
                FirmwareSource::Installed(path.clone()),
                choice.allow_unknown,
            );
        }
    }
    if let Some(bytes) = embedded() {
        return verify(
            bytes.to_vec(),
            FirmwareSource::Embedded,
            "the embedded image",
            false,
        );
    }
    Err(fail_then(
        FailureKind::Firmware,
        not_found(&choice.install_dir),
        get_firmware(&choice.install_dir),
    ))
}

/// True when no source of an image is configured at all (no flag, no env,
/// no installed copy, nothing embedded).
pub fn nothing_configured(choice: &FirmwareChoice) -> bool {
    choice.explicit.is_none()
        && std::env::var_os(FIRMWARE_ENV).is_none_or(|p| p.is_empty())
        && !manifest()
            .iter()
            .any(|e| choice.install_dir.join(&e.name).exists())
        && embedded().is_none()
}

/// Read a file and verify it against the manifest.
pub fn read_verified(
    path: &Path,
    source: FirmwareSource,
    allow_unknown: bool,
) -> anyhow::Result<FirmwareImage> {
    let unreadable = |e: std::io::Error| {
        fail_then(
            FailureKind::Firmware,
            format!("cannot read firmware {}: {e}", path.display()),
            NextStep::FetchOrNameCopy,
        )
    };
    let size = std::fs::metadata(path).map_err(unreadable)?.len();
    if size == 0 || size > MAX_IMAGE_BYTES {
        return Err(fail_then(
            FailureKind::Firmware,
            format!(
                "firmware {} has {size} bytes, a Coral image about 11 KB",
                path.display()
            ),
            NextStep::NameRealImage,
        ));
    }
    let bytes = std::fs::read(path).map_err(unreadable)?;
    verify(bytes, source, &path.display().to_string(), allow_unknown)
}

fn verify(
    bytes: Vec<u8>,
    source: FirmwareSource,
    what: &str,
    allow_unknown: bool,
) -> anyhow::Result<FirmwareImage> {
    let sha256 = sha256_hex(&bytes);
    let known_name = known(&sha256).map(|e| e.name.clone());
    if known_name.is_none() {
        if !allow_unknown {
            return Err(fail_then(
                FailureKind::Firmware,
                format!("firmware {what} (sha256 {sha256}) is not a known Coral image"),
                NextStep::KnownFirmwareOrAllow,
            ));
        }
        log::warn!(
            "firmware {what} (sha256 {sha256}) is not in the manifest; uploading it anyway ({})",
            Flag::AllowUnknownFirmware
        );
    }
    Ok(FirmwareImage {
        bytes,
        sha256,
        source,
        known_name,
    })
}

impl std::fmt::Display for FirmwareSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FirmwareSource::Flag(p) => write!(f, "{} {}", Flag::Firmware, p.display()),
            FirmwareSource::Env(p) => write!(f, "${FIRMWARE_ENV} = {}", p.display()),
            FirmwareSource::Installed(p) => write!(f, "installed copy {}", p.display()),
            FirmwareSource::Embedded => f.write_str("embedded in this binary"),
            FirmwareSource::Simulated => f.write_str("simulation stand-in (not a real image)"),
        }
    }
}
