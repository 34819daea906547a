//! Parsers for `xe` output: `--minimal` lists and `params=` records.
//!
//! CONTRACT (bodies to be written).
