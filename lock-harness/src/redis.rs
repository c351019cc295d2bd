//! redis servers for tests (being written).
