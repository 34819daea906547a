//! Simulators of the real things, strict as the fact sheets describe them:
//! a Coral speaking DFU 1.1 ([`coral`]), an XAPI pool answering `xe`
//! ([`xapi`]), and the two wired together as the built-in `--simulate` host
//! ([`host`]).

pub mod coral;
pub mod host;
pub mod xapi;
