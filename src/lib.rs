//! hytrain facade.
