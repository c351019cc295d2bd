//! lock-harness (work in progress).
