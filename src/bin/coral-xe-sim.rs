//! TODO: a fake `xe` backed by the simulated XAPI world in a JSON state file.
fn main() {}
