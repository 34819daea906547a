//! The procedures `coral` automates, one module each. Each checks the current
//! state before every step, so a rerun after any failure is safe.

pub mod attach;
pub mod boot;
pub mod bring_back;
pub mod detach;
pub mod doctor;
pub mod firmware_cmd;
pub mod init;
pub mod service;
pub mod status;
pub mod unfinished;
pub mod up;
pub mod watch;
pub mod xapi_common;
