//! TODO: the built-in --simulate host: simulated Coral + XAPI world wired together.
