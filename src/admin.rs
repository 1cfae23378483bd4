//! Admin HTTP endpoints (placeholder until the operations issue lands).
