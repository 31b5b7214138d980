//! Integration tests: one binary, modules inside.
