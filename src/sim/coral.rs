//! TODO: the in-process simulated Coral (DFU state machine) and its bus.
