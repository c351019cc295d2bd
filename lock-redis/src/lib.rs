//! lock-redis (work in progress).
