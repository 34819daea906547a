//! Embeds a firmware image when the builder names one with
//! `CORAL_EMBED_FIRMWARE=PATH`; the build fails unless its SHA-256 is in
//! `firmware/manifest.txt`. Without it nothing is embedded.

use sha2::{Digest, Sha256};
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=CORAL_EMBED_FIRMWARE");
    println!("cargo:rerun-if-changed=firmware/manifest.txt");
    println!("cargo::rustc-check-cfg=cfg(coral_embedded_firmware)");
    let Some(path) = std::env::var_os("CORAL_EMBED_FIRMWARE").filter(|p| !p.is_empty()) else {
        return;
    };
    let path = PathBuf::from(path);
    println!("cargo:rerun-if-changed={}", path.display());
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("CORAL_EMBED_FIRMWARE={}: {e}", path.display()));
    let digest = hex::encode(Sha256::digest(&bytes));
    let manifest = std::fs::read_to_string("firmware/manifest.txt").expect("firmware/manifest.txt");
    let known = manifest
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .any(|l| l.split_whitespace().nth(2) == Some(digest.as_str()));
    assert!(
        known,
        "CORAL_EMBED_FIRMWARE={}: sha256 {digest} is not in firmware/manifest.txt; embed one of the libedgetpu images",
        path.display()
    );
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("embedded_firmware.bin");
    std::fs::write(&out, &bytes).expect("write the embedded image");
    println!("cargo:rustc-cfg=coral_embedded_firmware");
}
