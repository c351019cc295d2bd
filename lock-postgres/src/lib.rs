//! lock-postgres (work in progress).
