//! TODO: one coral run at a time: a lock file (flock) with a deadline or --no-wait.
