//! Refresh schedule and backoff (placeholder).
