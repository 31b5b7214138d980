//! Integration tests: one binary, modules inside.

mod bad_input;
mod oci_io;
mod support;
