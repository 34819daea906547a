//! The end-to-end harness lives in the test kit (`tests/testkit/src/e2e.rs`).
#![allow(unused_imports)]

pub use coral_testkit::e2e::*;
