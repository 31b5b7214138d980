//! Test support: real services and generated fixtures.
#![allow(dead_code)]

pub mod images;
pub mod registry;
