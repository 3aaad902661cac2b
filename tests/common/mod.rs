//! Fixtures shared by the integration tests (need root; fail loudly when something is missing).
pub mod dockerd;
