//! `coral firmware show|install|fetch`. Each returns the text to print.

use crate::error::{fail_then, FailureKind, NextStep};
use crate::firmware::{self, FirmwareChoice, FirmwareImage, FirmwareSource};
use std::path::Path;
use std::process::Command;

/// Env var replacing the URL base of `fetch` (tests use a `file://` base).
pub const URL_BASE_ENV: &str = "CORAL_FIRMWARE_URL_BASE";

/// Which image would be used, from where, and its checksum.
pub fn show(choice: &FirmwareChoice) -> anyhow::Result<String> {
    Ok(describe(&firmware::load(choice)?))
}

/// An image as `show` prints it: name, source, size, checksum.
pub fn describe(image: &FirmwareImage) -> String {
    format!(
        "image:  {}\nfrom:   {}\nsize:   {} bytes\nsha256: {}",
        image
            .known_name
            .as_deref()
            .unwrap_or("unknown (not in the manifest)"),
        image.source,
        image.bytes.len(),
        image.sha256
    )
}

/// Verify `file` and install it atomically under `dir`; with `dry_run`
/// (`--dry-run`, `--simulate`) verify it and say where it would go.
pub fn install(
    file: &Path,
    dir: &Path,
    allow_unknown: bool,
    dry_run: bool,
) -> anyhow::Result<String> {
    let image = firmware::read_verified(
        file,
        FirmwareSource::Flag(file.to_path_buf()),
        allow_unknown,
    )?;
    let name = match &image.known_name {
        Some(name) => name.clone(),
        None => file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firmware.bin".into()),
    };
    let target = dir.join(&name);
    if dry_run {
        return Ok(format!(
            "would install {} ({} bytes, sha256 {} verified); nothing written",
            target.display(),
            image.bytes.len(),
            image.sha256
        ));
    }
    write_atomically(dir, &target, &image.bytes)?;
    Ok(format!(
        "installed {} ({} bytes, sha256 {})",
        target.display(),
        image.bytes.len(),
        image.sha256
    ))
}

/// Download the pinned default image with `curl`, verify, install under
/// `dir`; with `dry_run` only say what would be downloaded and written.
pub fn fetch(dir: &Path, dry_run: bool) -> anyhow::Result<String> {
    let entry = firmware::manifest().first().ok_or_else(|| {
        fail_then(
            FailureKind::Firmware,
            "the firmware manifest built into coral is empty",
            NextStep::RebuildWithManifest,
        )
    })?;
    let url = match std::env::var(URL_BASE_ENV) {
        Ok(base) => format!("{}/{}", base.trim_end_matches('/'), entry.name),
        Err(_) => entry.url.clone(),
    };
    if dry_run {
        return Ok(format!(
            "would download {url} with curl, check it is {} bytes with sha256 {}, and install it as {}; nothing downloaded or written",
            entry.size,
            entry.sha256,
            dir.join(&entry.name).display()
        ));
    }
    create_dir(dir)?;
    let partial = dir.join(format!(".{}.part", entry.name));
    log::info!("downloading {url}");
    let result = Command::new("curl")
        .args(["-fsSL", "--retry", "2", "--max-time", "120", "-o"])
        .arg(&partial)
        .arg(&url)
        .output();
    let downloaded = match result {
        Ok(out) if out.status.success() => std::fs::read(&partial).ok(),
        Ok(out) => {
            let _ = std::fs::remove_file(&partial);
            return Err(fail_then(
                FailureKind::Firmware,
                format!(
                    "downloading {url} failed ({})",
                    // curl says it once per try: the last is the line.
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .rfind(|l| !l.trim().is_empty())
                        .unwrap_or("no reason given")
                        .trim()
                ),
                NextStep::DownloadElsewhere {
                    url: url.clone(),
                    dir: dir.display().to_string(),
                },
            ));
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(fail_then(
                FailureKind::Firmware,
                format!("cannot run curl ({e})"),
                NextStep::DownloadElsewhere {
                    url: url.clone(),
                    dir: dir.display().to_string(),
                },
            ));
        }
    };
    let _ = std::fs::remove_file(&partial);
    let bytes = downloaded.unwrap_or_default();
    let sha256 = firmware::sha256_hex(&bytes);
    if bytes.len() != entry.size || sha256 != entry.sha256 {
        return Err(fail_then(
            FailureKind::Firmware,
            format!(
                "the download from {url} is not the pinned image ({} bytes, sha256 {sha256}; expected {} bytes, {}); nothing was installed",
                bytes.len(),
                entry.size,
                entry.sha256
            ),
            NextStep::RetryFetchOrElsewhere { url: url.clone() },
        ));
    }
    let target = dir.join(&entry.name);
    write_atomically(dir, &target, &bytes)?;
    Ok(format!(
        "installed {} ({} bytes, sha256 {sha256})",
        target.display(),
        bytes.len()
    ))
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        fail_then(
            FailureKind::Firmware,
            format!("cannot create {}: {e}", dir.display()),
            NextStep::RootOrOtherDir,
        )
    })
}

/// The mode of an installed firmware image.
const IMAGE_MODE: u32 = 0o644;

/// Install `bytes` as `target` ([`crate::atomic_file`]): readers see the old
/// file or the new one, and nothing is written through a symlink.
fn write_atomically(dir: &Path, target: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    create_dir(dir)?;
    crate::atomic_file::write(target, bytes, IMAGE_MODE).map_err(|e| {
        fail_then(
            FailureKind::Firmware,
            format!("cannot install {}: {e}", target.display()),
            NextStep::RootOrOtherDir,
        )
    })
}
