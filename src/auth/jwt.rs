//! Reading the claims of a JWT-shaped token (placeholder).
