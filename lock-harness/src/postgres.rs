//! postgres servers for tests (being written).
