//! distlock (work in progress).
